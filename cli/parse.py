"""Option texts read into values: sizes, pairs, lists, KEY=VALUE pairs, KD method specs. Each
bad text is one error naming the option and the form it takes."""

from __future__ import annotations

from kdcache.core.errors import KDCacheError


def parse_size(text: str | None, option: str) -> tuple[int, int] | None:
    """'96x128' -> (96, 128) (H x W); '256' -> (256, 256)."""
    if text is None:
        return None
    try:
        parts = [int(p) for p in text.lower().replace(",", "x").split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 1:
        raise KDCacheError(f"{option} takes HxW (e.g. 96x128) or one number, got '{text}'")
    return parts[0], parts[1]


def parse_pair(text: str | None, option: str) -> tuple[float, float] | None:
    if text is None:
        return None
    try:
        lo, hi = (float(p) for p in text.split(","))
    except ValueError:
        raise KDCacheError(f"{option} takes 'lo,hi' (e.g. 0.5,2.0), got '{text}'") from None
    return lo, hi


def _value(text: str):
    words = {"true": True, "false": False, "none": None}
    if text.lower() in words:
        return words[text.lower()]
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if "x" in text and all(p.isdigit() for p in text.split("x")):
        return [int(p) for p in text.split("x")]
    return text


def parse_key_values(items: list[str] | dict | None, option: str) -> dict:
    """['size=200', 'encoder-name=resnet18'] -> {'size': 200, 'encoder_name': 'resnet18'}; a mapping
    (from a --config file) as it is."""
    opts = dict(items) if isinstance(items, dict) else {}
    for item in [] if isinstance(items, dict) else items or []:
        if "=" not in item:
            raise KDCacheError(f"{option} takes KEY=VALUE, got '{item}'")
        k, v = item.split("=", 1)
        opts[k.strip().replace("-", "_")] = _value(v.strip())
    return opts


def parse_method(spec: str | dict) -> dict:
    """'kl' or 'kl:weight=0.5,temperature=2' -> {"name": "kl", "weight": 0.5, "temperature": 2}."""
    if isinstance(spec, dict):  # from a --config file (a run's config.json)
        return dict(spec)
    name, _, rest = spec.partition(":")
    out: dict = {"name": name.strip()}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        if "=" not in item:
            raise KDCacheError(f"--method takes NAME or NAME:key=value,..., got '{spec}'")
        k, v = item.split("=", 1)
        out[k.strip().replace("-", "_")] = _value(v.strip())
    return out


def parse_list(text: str | None, option: str, cast=str) -> tuple:
    if not text:
        return ()
    try:
        return tuple(cast(x.strip()) for x in text.split(",") if x.strip())
    except ValueError:
        raise KDCacheError(f"{option} takes comma-separated values, got '{text}'") from None
