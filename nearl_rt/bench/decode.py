"""`python -m nearl_rt.bench.decode`: decode time per image (nearl_rt.core.imaging.load_image: file -> the model's RGB
pixels) for an 8-bit PNG, a 16-bit PNG, a 16-bit TIFF and 16-bit DICOMs (uncompressed, RLE, and JPEG
Lossless / JPEG 2000 lossless when python-gdcm can encode them), all of one synthetic X-ray-like image.
Rounds interleave the kinds (a noisy machine slows them alike); the median per kind is printed as a
Markdown table, with the file sizes."""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


from nearl_rt.core.imaging import load_image


def xray(size: int, seed: int = 0) -> np.ndarray:
    """12-bit values in uint16: smooth anatomy-like structure plus noise (compresses like a real radiograph)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size] / size
    img = 800 + 2000 * np.exp(-((x - 0.35) ** 2 + (y - 0.5) ** 2) / 0.05) + 2000 * np.exp(
        -((x - 0.65) ** 2 + (y - 0.5) ** 2) / 0.05) + 300 * np.sin(40 * y) + rng.normal(0, 30, (size, size))
    return np.clip(img, 0, 4095).astype(np.uint16)


def write_dicom(path, arr: np.ndarray, photometric: str = "MONOCHROME2", transfer_syntax=None, *,
                bits_stored=None, compress=None, **attrs):
    """An uncompressed (or `compress`ed, pydicom's own RLE encoder) DICOM of a uint8/uint16/int16 array
    ([frames,] rows, columns[, 3]); `attrs` set further elements (RescaleSlope=..., WindowCenter=...)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax or ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    colour = photometric not in ("MONOCHROME1", "MONOCHROME2")
    frames = arr.shape[0] if arr.ndim == (4 if colour else 3) else 1
    ds.Rows, ds.Columns = arr.shape[-3:-1] if colour else arr.shape[-2:]
    ds.SamplesPerPixel = 3 if colour else 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 * arr.dtype.itemsize
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(arr.dtype.kind == "i")
    if colour:
        ds.PlanarConfiguration = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.PixelData = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
    if compress is not None:
        ds.compress(compress)
    ds.save_as(path, enforce_file_format=True, implicit_vr=False, little_endian=True)
    return path


def gdcm_transcode(src: Path, dst: Path, syntax: str) -> Path:
    """Re-encode with GDCM (pydicom has no JPEG Lossless / JPEG 2000 encoder of its own)."""
    import gdcm
    reader = gdcm.ImageReader()
    reader.SetFileName(str(src))
    if not reader.Read():
        raise RuntimeError(f"gdcm cannot read {src}")
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(getattr(gdcm.TransferSyntax, syntax)))
    change.SetInput(reader.GetImage())
    if not change.Change():
        raise RuntimeError(f"gdcm cannot encode {syntax}")
    writer = gdcm.ImageWriter()
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    writer.SetFileName(str(dst))
    if not writer.Write():
        raise RuntimeError(f"gdcm cannot write {dst}")
    return dst


def make_files(folder: Path, size: int) -> dict:
    from pydicom.uid import RLELossless
    img = xray(size)
    files = {}
    Image.fromarray((img >> 4).astype(np.uint8)).save(folder / "x8.png")
    files["8-bit PNG"] = folder / "x8.png"
    Image.fromarray(img).save(folder / "x16.png")
    files["16-bit PNG"] = folder / "x16.png"
    Image.fromarray(img).save(folder / "x16.tif")
    files["16-bit TIFF (uncompressed)"] = folder / "x16.tif"
    files["DICOM uncompressed"] = write_dicom(folder / "raw.dcm", img, bits_stored=12)
    files["DICOM RLE Lossless"] = write_dicom(folder / "rle.dcm", img, bits_stored=12, compress=RLELossless)
    for name, syntax in (("DICOM JPEG Lossless (process 14 SV1)", "JPEGLosslessProcess14_1"),
                         ("DICOM JPEG 2000 lossless", "JPEG2000Lossless")):
        try:
            files[name] = gdcm_transcode(files["DICOM uncompressed"], folder / f"{syntax}.dcm", syntax)
        except (ImportError, RuntimeError, AttributeError) as e:
            print(f"({name} left out: {e})", file=sys.stderr)
    return files


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m nearl_rt.bench.decode", description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=2048, help="image side in pixels (default 2048, a chest X-ray)")
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        files = make_files(Path(tmp), args.size)
        reference = np.asarray(load_image(files["16-bit PNG"]))
        for name, path in files.items():  # warm-up, and every 16-bit file decodes to the same pixels
            got = np.asarray(load_image(path))
            if name != "8-bit PNG" and not np.array_equal(got, reference):
                raise SystemExit(f"{name} decodes differently from the 16-bit PNG")
        times = {name: [] for name in files}
        for _ in range(args.rounds):
            for name, path in files.items():
                t0 = time.perf_counter()
                load_image(path)
                times[name].append(time.perf_counter() - t0)
        print(f"decode {args.size}x{args.size} 12-bit image to RGB uint8, median of {args.rounds} interleaved rounds; "
              f"{platform.processor() or platform.machine()}, Python {platform.python_version()}")
        print("| file | size (KiB) | decode (ms) |\n|---|---|---|")
        for name, path in files.items():
            print(f"| {name} | {path.stat().st_size / 1024:.0f} | {statistics.median(times[name]) * 1e3:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
