"""Image decoding: a file or array -> the 8-bit RGB pixels the model sees (NumPy + Pillow + pydicom; no
PyTorch). Training, evaluation, prediction and nearl_rt.NearlSession all decode through here.

- 8-bit images (PNG, JPEG, BMP, ... and uint8 arrays) are used as they are (Pillow `convert("RGB")`).
- High bit depth grey images (16-bit PNG/TIFF "I;16", 32-bit "I", float "F", and integer / float arrays)
  go through an `IntensityPolicy` to 0..255: by default each image's own min..max, never a clip.
- DICOM: stored values -> Modality LUT (Rescale Slope/Intercept or LUT) -> the file's VOI LUT or first
  window when it has one (else the intensity policy) -> 0..255; MONOCHROME1 inverted; RGB / YBR_* as RGB
  (pydicom converts YBR); PALETTE COLOR through its LUT. Compressed transfer syntaxes decode through the
  pydicom pixel-data plugins installed (python-gdcm with `pip install 'nearl-rt[dicom]'`).
- A file holding several frames (multi-frame DICOM, multi-page TIFF) is refused unless one frame is asked
  for: `Frame(path, index)` (`expand_frames` lists them all; CLIs: `--frames each`).

Every failure is an `ImageError` (a ValueError) whose one-line message names the file and the problem,
with `.reason` a short category ("no pixel data", "unsupported transfer syntax", ...).
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from typing import Iterable, NamedTuple, Optional, Union

import numpy as np
from PIL import Image


class Frame(NamedTuple):
    """One frame of a multi-frame file; `index` counts from 0, the name shows DICOM's 1-based number."""
    path: str
    index: int

    def __str__(self) -> str:
        return f"{self.path}:frame={self.index + 1}"


ImageLike = Union[str, os.PathLike, Frame, Image.Image, np.ndarray]

DICOM_SUFFIXES = (".dcm", ".dicom")
FRAME_OPTIONS = ("refuse", "each")
# The DICOM transfer syntax of an Encapsulated PDF/CDA/STL/... is not the problem: the object is not an image.
_ENCAPSULATED = "EncapsulatedDocument"


class ImageError(ValueError):
    """An input is not a readable, supported image. The message names the file and the fix."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


class IntensityMismatchWarning(UserWarning):
    """Images are being mapped to 0..255 differently from how the model's training data was."""


# ------------------------------------------------------------------------------------ intensity policy
_MODES = {"minmax": 0, "percentile": 2, "full": 0, "window": 2}  # mode -> number of parameters
VOI_OPTIONS = ("file", "policy")


@dataclass(frozen=True)
class IntensityPolicy:
    """How grey values of more than 8 bits become the model's 0..255 (8-bit images are used as they are).

    mode "minmax" (default): each image's own min..max -> 0..255 (order and full range kept, nothing clipped);
    "percentile:LO,HI": the image's LO-th..HI-th percentiles -> 0..255, values beyond saturate;
    "full": the type's nominal range (DICOM: Bits Stored through the Modality LUT; uint16 0..65535; int16
    -32768..32767; float 0..1), refused when a value lies outside it;
    "window:CENTER,WIDTH": the fixed window [C - W/2, C + W/2] -> 0..255 (in Modality LUT units, e.g. HU for
    CT), values beyond saturate.
    dicom_voi "file" (default): a DICOM's own VOI LUT / first window is applied when it has one and the
    policy only when not; "policy": the policy always.
    """
    mode: str = "minmax"
    params: tuple = ()
    dicom_voi: str = "file"

    def __post_init__(self):
        if self.mode not in _MODES:
            raise ValueError(f"unknown intensity mode {self.mode!r}; use minmax, percentile:LO,HI, full or "
                             f"window:CENTER,WIDTH")
        params = tuple(float(p) for p in self.params)
        object.__setattr__(self, "params", params)
        if len(params) != _MODES[self.mode] or not all(np.isfinite(params)):
            raise ValueError(f"intensity mode {self.mode!r} takes {_MODES[self.mode]} finite number(s), got "
                             f"{list(self.params)}")
        if self.mode == "percentile" and not 0 <= params[0] < params[1] <= 100:
            raise ValueError(f"percentile:{params[0]:g},{params[1]:g} needs 0 <= LO < HI <= 100")
        if self.mode == "window" and params[1] <= 0:
            raise ValueError(f"window:{params[0]:g},{params[1]:g} needs a width > 0")
        if self.dicom_voi not in VOI_OPTIONS:
            raise ValueError(f"dicom_voi={self.dicom_voi!r}: use one of {VOI_OPTIONS}")

    @classmethod
    def parse(cls, text: str, dicom_voi: str = "file") -> "IntensityPolicy":
        """'minmax', 'full', 'percentile:0.5,99.5' or 'window:40,400'."""
        mode, _, rest = text.strip().partition(":")
        try:
            params = tuple(float(p) for p in rest.split(",")) if rest else ()
        except ValueError:
            raise ValueError(f"intensity {text!r}: parameters must be numbers, e.g. percentile:0.5,99.5 or "
                             f"window:40,400") from None
        return cls(mode, params, dicom_voi)

    def __str__(self) -> str:
        spec = self.mode + (":" + ",".join(f"{p:g}" for p in self.params) if self.params else "")
        return spec + (", dicom_voi=policy" if self.dicom_voi != "file" else "")

    def to_dict(self) -> dict:
        return {"mode": self.mode, "params": list(self.params), "dicom_voi": self.dicom_voi}

    @classmethod
    def from_dict(cls, d: dict) -> "IntensityPolicy":
        return cls(d.get("mode", "minmax"), tuple(d.get("params", ())), d.get("dicom_voi", "file"))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def to_uint8(self, values: np.ndarray, nominal: tuple, name: str) -> np.ndarray:
        """Grey (or colour) values of any numeric dtype -> uint8 by this policy; `nominal` = (lo, hi) of the
        data type, used by mode "full"."""
        if values.dtype.kind == "f":
            bad = int(values.size - np.count_nonzero(np.isfinite(values)))
            if bad:
                raise ImageError(f"{name} has {bad} NaN/Inf pixel value(s) of {values.size}; fix or remove the image",
                                 "non-finite pixels")
        if self.mode == "minmax":
            lo, hi = float(values.min()), float(values.max())
        elif self.mode == "percentile":
            lo, hi = (float(q) for q in np.percentile(values, self.params))
        elif self.mode == "window":
            c, w = self.params
            lo, hi = c - w / 2, c + w / 2
        else:
            lo, hi = nominal
            vmin, vmax = float(values.min()), float(values.max())
            if vmin < lo or vmax > hi:
                raise ImageError(f"{name} has values {vmin:g}..{vmax:g} outside its type's range {lo:g}..{hi:g}; "
                                 f"use --intensity minmax (or a window)", "values outside range")
        return scale_to_uint8(values, lo, hi)


DEFAULT_POLICY = IntensityPolicy()


def scale_to_uint8(v: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """[lo, hi] -> [0, 255] linearly in float64, rounded half to even; values beyond saturate; a flat image
    (hi <= lo) becomes 0."""
    if hi <= lo:
        return np.zeros(v.shape, np.uint8)
    out = np.asarray(v, np.float64) - lo  # a new array: the in-place steps below never touch `v`
    out *= 255.0 / (hi - lo)
    np.clip(out, 0.0, 255.0, out=out)
    return np.rint(out, out=out).astype(np.uint8)


def resolve_policy(stored: Optional[Union[dict, str]], override: Optional[IntensityPolicy],
                   where: str) -> IntensityPolicy:
    """The policy a model was trained with (`stored`: a checkpoint's or ONNX file's record; None for files
    written before policies were recorded, which read 8-bit images exactly like the default), or `override`
    with an IntensityMismatchWarning when it differs."""
    if isinstance(stored, str):
        stored = json.loads(stored)
    trained = IntensityPolicy.from_dict(stored) if stored else DEFAULT_POLICY
    if override is None or override == trained:
        return trained
    warnings.warn(f"{where} was trained with intensity policy {trained}; mapping images with {override} instead "
                  f"shows the model pixels unlike its training data", IntensityMismatchWarning, stacklevel=2)
    return override


# ----------------------------------------------------------------------------------------------- decoding
def load_image(src: ImageLike, intensity: Optional[IntensityPolicy] = None) -> Image.Image:
    """A path, Frame, PIL image or array ([H, W], [H, W, 1|3|4]; uint8 as is, other numeric dtypes by the
    intensity policy) as the RGB PIL image the model's preprocessing takes."""
    policy = intensity or DEFAULT_POLICY
    if isinstance(src, Frame):
        return _load_file(os.fspath(src.path), policy, src.index)
    if isinstance(src, (str, os.PathLike)):
        return _load_file(os.fspath(src), policy, None)
    if isinstance(src, Image.Image):
        return _from_pil(src, policy, "image")
    if isinstance(src, np.ndarray):
        return _from_array(src, policy, f"image array {src.dtype}{list(src.shape)}")
    raise TypeError(f"cannot use {type(src).__name__} as an image: pass a file path, Frame, PIL image or array")


def has_dicom_preamble(path) -> bool:
    """A DICOM Part 10 file: 128-byte preamble, then b'DICM'."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def is_dicom(path) -> bool:
    return os.fspath(path).lower().endswith(DICOM_SUFFIXES) or has_dicom_preamble(path)


def count_frames(path) -> int:
    """Frames in an image file (1 for ordinary images; 1 too when the file is unreadable: reading it
    then reports the problem)."""
    path = os.fspath(path)
    try:
        if is_dicom(path):
            import pydicom
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            return max(1, int(ds.get("NumberOfFrames") or 1))
        with Image.open(path) as im:
            return int(getattr(im, "n_frames", 1))
    except Exception:  # noqa: BLE001 - the decode reports it, with the reason
        return 1


def expand_frames(sources: Iterable) -> tuple[list, list]:
    """Each multi-frame file path -> one Frame per frame. Returns (sources, index of the source each came from)."""
    out, origin = [], []
    for i, src in enumerate(sources):
        n = count_frames(src) if isinstance(src, (str, os.PathLike)) else 1
        out += [Frame(os.fspath(src), k) for k in range(n)] if n > 1 else [src]
        origin += [i] * n
    return out, origin


def _multi_frame(name: str, n: int) -> ImageError:
    return ImageError(f"{name} holds {n} frames; read one image per frame with --frames each "
                      f"(Python: nearl_rt.core.imaging.expand_frames / Frame(path, index))", "multi-frame")


def _load_file(path: str, policy: IntensityPolicy, frame: Optional[int]) -> Image.Image:
    if not os.path.exists(path):
        raise FileNotFoundError(f"image not found: {path}")
    if is_dicom(path):
        return _from_dicom(path, policy, frame)
    try:
        with Image.open(path) as im:
            n = int(getattr(im, "n_frames", 1))
            if frame is None and n > 1:
                raise _multi_frame(path, n)
            if frame is not None:
                if not 0 <= frame < n:
                    raise ImageError(f"{path} has {n} frame(s), no frame {frame + 1}", "no such frame")
                im.seek(frame)
            return _from_pil(im, policy, path)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"{path} is too large to decode safely ({e} Pillow refuses it; if the image is genuine, raise "
                         f"PIL.Image.MAX_IMAGE_PIXELS)", "too large") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"cannot read image {path}: {e}", "not an image") from None


_HIGH_DEPTH_MODES = ("I", "F")


def _from_pil(im: Image.Image, policy: IntensityPolicy, name: str) -> Image.Image:
    if 0 in im.size:
        raise ImageError(f"{name} is an empty image ({im.size[0]}x{im.size[1]} pixels)", "empty image")
    if im.mode in _HIGH_DEPTH_MODES or im.mode.startswith("I;16"):
        return _from_array(np.asarray(im), policy, name)
    # Pillow reads 16-bit-per-channel colour (PNG RGB/RGBA/LA of depth 16) keeping only the high byte.
    for tile in getattr(im, "tile", None) or ():
        rawmode = tile.args if isinstance(tile.args, str) else (tile.args[0] if tile.args else "")
        if isinstance(rawmode, str) and ";16" in rawmode:
            raise ImageError(f"{name} is a 16-bit-per-channel {im.mode} image, which Pillow reads at 8 bits; save "
                             f"it as 16-bit greyscale or 8-bit colour", "16-bit colour")
    return im.convert("RGB")


def _nominal_range(dtype: np.dtype) -> tuple:
    if dtype.kind == "f":
        return 0.0, 1.0
    info = np.iinfo(dtype)
    return float(info.min), float(info.max)


def _from_array(a: np.ndarray, policy: IntensityPolicy, name: str, nominal: Optional[tuple] = None) -> Image.Image:
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
        raise ImageError(f"{name}: image arrays must be [H, W] or [H, W, 1|3|4] (channels last), got shape "
                         f"{a.shape}", "bad shape")
    if a.size == 0:
        raise ImageError(f"{name} is an empty image (shape {a.shape})", "empty image")
    if a.dtype == np.uint8:
        return Image.fromarray(a).convert("RGB")
    if a.dtype.kind not in "uif":
        raise ImageError(f"{name}: image arrays must be of an integer or float dtype, got {a.dtype}", "bad dtype")
    if a.ndim == 3:
        a = a[:, :, :3]  # drop alpha, as Pillow's convert("RGB") does for 8-bit images
    u8 = policy.to_uint8(a, nominal or _nominal_range(a.dtype), name)
    return Image.fromarray(u8).convert("RGB")


# -------------------------------------------------------------------------------------------------- DICOM
def _read_dicom(path: str):
    import pydicom
    from pydicom.errors import InvalidDicomError
    preamble = has_dicom_preamble(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, force=not preamble)
            known = [elem.tag for elem in ds if elem.tag.group in (0x0008, 0x0010, 0x0020, 0x0028, 0x7FE0)]
    except (InvalidDicomError, OSError, EOFError, ValueError, TypeError, KeyError, IndexError) as e:
        raise ImageError(f"cannot read DICOM {path}: damaged or not a DICOM file ({e.__class__.__name__}: "
                         f"{_one_line(e)})", "not a DICOM file") from None
    if not preamble and not known:
        raise ImageError(f"{path} is not a DICOM file (no 'DICM' header and no DICOM image attributes)",
                         "not a DICOM file")
    return ds


def _sop_class(ds) -> str:
    uid = ds.get("SOPClassUID") or getattr(getattr(ds, "file_meta", None), "get", lambda *_: None)("MediaStorageSOPClassUID")
    return getattr(uid, "name", None) or str(uid or "unknown SOP class")


def _decode_hint() -> str:
    try:
        import gdcm  # noqa: F401
    except ImportError:
        return "install the pixel-data plugin: pip install 'nearl-rt[dicom]' (python-gdcm)"
    return ("GDCM cannot decode it; pydicom also uses pylibjpeg + pylibjpeg-libjpeg (12-bit JPEG; GPL-3.0) or "
            "pylibjpeg-openjpeg when installed, or convert the file to an uncompressed transfer syntax")


def _from_dicom(path: str, policy: IntensityPolicy, frame: Optional[int]) -> Image.Image:
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, pixel_array
    ds = _read_dicom(path)
    if _ENCAPSULATED in ds:
        raise ImageError(f"{path} is an encapsulated document ({_sop_class(ds)}), not an image", "encapsulated document")
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        hint = " (the file may be truncated)" if "Rows" in ds else ""
        raise ImageError(f"{path} has no pixel data ({_sop_class(ds)}){hint}", "no pixel data")
    ts = getattr(getattr(ds, "file_meta", None), "get", lambda *_: None)("TransferSyntaxUID")
    if ts is not None and not ts.is_transfer_syntax:
        raise ImageError(f"{path} uses the unknown transfer syntax {ts}; convert it to a standard one",
                         "unsupported transfer syntax")
    if "Rows" not in ds or "Columns" not in ds:
        raise ImageError(f"{path} has pixel data but no Rows/Columns (damaged header)", "damaged header")
    rows, cols, n = (_int_attr(ds, key, path) for key in ("Rows", "Columns", "NumberOfFrames"))
    if rows == 0 or cols == 0:
        raise ImageError(f"{path} is an empty image ({cols}x{rows} pixels)", "empty image")
    n = max(1, n)
    if frame is None and n > 1:
        raise _multi_frame(path, n)
    if frame is not None and not 0 <= frame < n:
        raise ImageError(f"{path} has {n} frame(s), no frame {frame + 1}", "no such frame")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = pixel_array(ds, index=frame if n > 1 else None)  # YBR_* -> RGB, planar -> interleaved
    except (RuntimeError, NotImplementedError) as e:
        what = ts.name if ts is not None else "its"
        raise ImageError(f"cannot decode the {what} pixel data of {path}: {_decode_hint()} ({_one_line(e)})",
                         "unsupported transfer syntax") from None
    except (ValueError, AttributeError, TypeError, KeyError, IndexError) as e:
        raise ImageError(f"cannot decode the pixel data of {path}: truncated or damaged ({_one_line(e)})",
                         "damaged pixel data") from None
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        grey = _dicom_grey(arr, ds, policy, path, apply_modality_lut, apply_voi_lut)
        if photometric == "MONOCHROME1":  # the minimum value is white
            grey = 255 - grey
        return Image.fromarray(grey).convert("RGB")
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds)
        if rgb.dtype == np.uint8:
            return Image.fromarray(rgb)
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
        return Image.fromarray(scale_to_uint8(rgb, 0, 2 ** bits - 1))
    if photometric == "RGB" or photometric.startswith("YBR"):
        if arr.ndim != 3:
            raise ImageError(f"{path}: {photometric} pixel data of shape {arr.shape} (expected rows x columns x 3)",
                             "damaged pixel data")
        return _from_array(arr, policy, path, _stored_range(ds))
    raise ImageError(f"{path} has the unsupported Photometric Interpretation {photometric or 'none'}; "
                     f"supported: MONOCHROME1/2, RGB, YBR_*, PALETTE COLOR", "unsupported photometric interpretation")


def _one_line(e: Exception) -> str:
    return " ".join(line.strip() for line in str(e).strip().splitlines() if line.strip())


def _int_attr(ds, key: str, path: str) -> int:
    try:
        return int(ds.get(key) or 0)
    except (TypeError, ValueError):
        raise ImageError(f"{path} has an invalid {key} value {ds.get(key)!r} (damaged header)",
                         "damaged header") from None


def _stored_range(ds) -> tuple:
    bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 16)
    if int(ds.get("PixelRepresentation") or 0) == 0:
        return 0.0, float(2 ** bits - 1)
    return float(-2 ** (bits - 1)), float(2 ** (bits - 1) - 1)


def _modality_range(ds) -> tuple:
    """The range of Modality LUT output values (pydicom's windowing uses the same as its output range)."""
    if ds.get("ModalityLUTSequence"):
        return 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    lo, hi = _stored_range(ds)
    if "RescaleSlope" in ds and "RescaleIntercept" in ds:
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        lo, hi = lo * slope + intercept, hi * slope + intercept
    return lo, hi


def _voi_output_range(ds) -> Optional[tuple]:
    """The output range of the VOI transform pydicom's apply_voi_lut applies (LUT preferred, then the
    window), or None when the file has none."""
    seq = ds.get("VOILUTSequence")
    if seq and seq[0].get("LUTDescriptor") is not None and seq[0].get("LUTData") is not None:
        return 0.0, float(2 ** int(seq[0].LUTDescriptor[2]) - 1)
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        return _modality_range(ds)
    return None


def _dicom_grey(arr, ds, policy: IntensityPolicy, path: str, apply_modality_lut, apply_voi_lut) -> np.ndarray:
    if arr.ndim != 2:
        raise ImageError(f"{path}: grey pixel data of shape {arr.shape} (expected rows x columns)", "damaged pixel data")
    try:
        values = apply_modality_lut(arr, ds)
        voi = _voi_output_range(ds) if policy.dicom_voi == "file" else None
        if voi is not None:  # pydicom maps the window to [y0, y1]; y1 < y0 with a negative Rescale Slope
            (y0, y1), out = voi, apply_voi_lut(values, ds, index=0)
            return scale_to_uint8(out, y0, y1) if y1 > y0 else 255 - scale_to_uint8(out, y1, y0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, NotImplementedError) as e:
        raise ImageError(f"{path} has an invalid Modality/VOI LUT or window ({_one_line(e)}); "
                         f"pass --dicom-voi policy to ignore the file's window", "invalid LUT") from None
    return policy.to_uint8(values, tuple(sorted(_modality_range(ds))), path)
