"""Training: the supervised trainer (``trainer``), the student trainer that adds the KD terms
(``student``), an epoch's batches (``batches``), images with their cached targets as a student's
batches (``student_batches``) and per-epoch logging (``loggers``)."""
