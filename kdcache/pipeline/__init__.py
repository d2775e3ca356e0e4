"""What turns a sample into a training item: one sampled transform (``geometry``), preprocessing,
augmentation and the segmentation pipeline (``transforms``), cached maps taken through a geometry
(``warp``) and the DataLoader (``loaders``)."""
