"""nearl_rt.core.imaging: DICOM (pydicom's bundled test files), 16-bit / float images, the intensity policy, frames,
and every bad input (one clear message naming the file)."""
import argparse
import json
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

from nearl_rt.bench.decode import write_dicom
from nearl_rt.core.imaging import (DEFAULT_POLICY, Frame, ImageError, IntensityMismatchWarning, IntensityPolicy,
                            count_frames, expand_frames, load_image, resolve_policy, scale_to_uint8)
from nearl_rt.core.preprocess import preprocess_batch
from nearl_rt.data import DataError, Split, intensity_from_args, load_images, read_dataset, skip_summary

CFG = dict(size=32, mean=(0.48, 0.45, 0.40), std=(0.26, 0.26, 0.27))


def bundled(name):
    """A DICOM file that ships inside pydicom (never downloaded); skips when this version lacks it."""
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} is not bundled with pydicom {pydicom.__version__}")
    return path


def decodable(path):
    """Skip when no installed pixel-data plugin decodes this file's transfer syntax."""
    ds = pydicom.dcmread(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ds, ds.pixel_array
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"no installed plugin decodes {ds.file_meta.TransferSyntaxUID.name}: {e}")


def pixels(src, policy=None):
    return np.asarray(load_image(src, policy))


def grey(src, policy=None):
    rgb = pixels(src, policy)
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and (rgb == rgb[:, :, :1]).all()
    return rgb[:, :, 0]


def linear(v, lo, hi):
    """The documented mapping: [lo, hi] -> [0, 255], saturating beyond, rounded half to even."""
    return np.rint(np.clip((v - lo) * (255 / (hi - lo)), 0, 255)).astype(np.uint8)


def xray16(seed=0, shape=(41, 53)):
    """A 12-bit-in-16 grey image with structure (a gradient, a disc) and noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:shape[0], :shape[1]]
    img = 300 + 2500 * x / shape[1] + 900 * ((y - 20) ** 2 + (x - 25) ** 2 < 120) + rng.normal(0, 40, shape)
    return np.clip(img, 0, 4095).astype(np.uint16)


# ------------------------------------------------------------------------------------------ pydicom's files
def test_ct_modality_lut_then_minmax():
    """CT_small has Rescale Slope/Intercept and no window: HU values, then the default min..max policy."""
    ds, raw = decodable(bundled("CT_small.dcm"))
    hu = raw * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    want = linear(hu, hu.min(), hu.max())
    np.testing.assert_array_equal(grey(bundled("CT_small.dcm")), want)
    np.testing.assert_array_equal(grey(bundled("CT_small.dcm")), scale_to_uint8(apply_modality_lut(raw, ds),
                                                                                  hu.min(), hu.max()))


def test_mr_window_is_applied_as_pydicom_does():
    """MR_small has Window Center/Width: pydicom's VOI output, scaled from its output range to 0..255, and the
    DICOM LINEAR window formula (PS3.3 C.11.2.1.2) written out here agree."""
    path = bundled("MR_small.dcm")
    ds, raw = decodable(path)
    got = grey(path)
    lo, hi = -2 ** 15, 2 ** 15 - 1  # signed 16-bit, no rescale: pydicom's windowing output range
    np.testing.assert_array_equal(got, scale_to_uint8(apply_voi_lut(apply_modality_lut(raw, ds), ds), lo, hi))
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    x = raw.astype(np.float64)
    standard = np.where(x <= c - 0.5 - (w - 1) / 2, 0.0, np.where(x > c - 0.5 + (w - 1) / 2, 255.0,
                                                                 ((x - (c - 0.5)) / (w - 1) + 0.5) * 255))
    assert np.abs(got - standard).max() <= 0.5 + 1e-6
    # --dicom-voi policy: the window is ignored, the intensity policy maps the stored range
    ignore = grey(path, IntensityPolicy("minmax", dicom_voi="policy"))
    np.testing.assert_array_equal(ignore, linear(x, x.min(), x.max()))


@pytest.mark.parametrize("name", ["MR_small_bigendian.dcm", "MR_small_implicit.dcm", "MR_small_RLE.dcm",
                                  "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"])
def test_lossless_encodings_decode_to_the_uncompressed_pixels(name):
    path = bundled(name)
    decodable(path)
    np.testing.assert_array_equal(pixels(path), pixels(bundled("MR_small.dcm")))


def test_jpeg_lossless_rgb_and_lossy_j2k_ct():
    path = bundled("SC_rgb_jpeg_gdcm.dcm")  # JPEG Lossless, process 14
    decodable(path)
    np.testing.assert_array_equal(pixels(path), pydicom.dcmread(bundled("SC_rgb_rle.dcm")).pixel_array)
    path = bundled("693_J2KI.dcm")  # lossy JPEG 2000 CT with a window
    ds, raw = decodable(path)
    want = scale_to_uint8(apply_voi_lut(apply_modality_lut(raw, ds), ds),
                          *(v * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for v in (-2 ** 13, 2 ** 13 - 1)))
    np.testing.assert_array_equal(grey(path), want)


def test_monochrome1_is_inverted(tmp_path):
    ds = pydicom.dcmread(bundled("CT_small.dcm"))
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "m1.dcm")
    np.testing.assert_array_equal(grey(tmp_path / "m1.dcm"), 255 - grey(bundled("CT_small.dcm")))


def test_bundled_monochrome1_file(tmp_path):
    folder = Path(bundled("CT_small.dcm")).parent
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        files = [f for f in sorted(folder.glob("*.dcm")) if pydicom.dcmread(f, stop_before_pixels=True, force=True)
                 .get("PhotometricInterpretation") == "MONOCHROME1"]
    if not files:
        pytest.skip(f"pydicom {pydicom.__version__} bundles no MONOCHROME1 file (its MONOCHROME1 examples are "
                    f"download-only); test_monochrome1_is_inverted covers the inversion")
    ds, _ = decodable(files[0])
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.save_as(tmp_path / "as_m2.dcm")
    np.testing.assert_array_equal(grey(files[0]), 255 - grey(tmp_path / "as_m2.dcm"))


def test_colour_photometric_interpretations(tmp_path):
    ref = pydicom.dcmread(bundled("SC_rgb_rle.dcm")).pixel_array  # RGB test pattern
    np.testing.assert_array_equal(pixels(bundled("SC_rgb_rle.dcm")), ref)
    ybr = bundled("SC_ybr_full_422_uncompressed.dcm")  # YBR_FULL_422 -> RGB (8-bit YCbCr rounding)
    assert np.abs(pixels(ybr).astype(int) - ref).max() <= 8
    ybr_jpeg = bundled("SC_rgb_jpeg_dcmtk.dcm")  # lossy JPEG in YBR_FULL
    decodable(ybr_jpeg)
    assert np.abs(pixels(ybr_jpeg).astype(int) - ref).mean() < 2
    # PlanarConfiguration 1 (RRR..GGG..BBB..) reads like 0 (RGBRGB..)
    interleaved = write_dicom(tmp_path / "pc0.dcm", ref, "RGB")
    planar = write_dicom(tmp_path / "pc1.dcm", ref, "RGB")
    ds = pydicom.dcmread(planar)
    ds.PlanarConfiguration, ds.PixelData = 1, np.ascontiguousarray(ref.transpose(2, 0, 1)).tobytes()
    ds.save_as(planar)
    np.testing.assert_array_equal(pixels(planar), ref)
    np.testing.assert_array_equal(pixels(interleaved), ref)
    palette = bundled("examples_palette.dcm")
    ds = pydicom.dcmread(palette)
    lut = apply_color_lut(ds.pixel_array, ds)
    np.testing.assert_array_equal(pixels(palette), scale_to_uint8(lut, 0, 2 ** 16 - 1) if lut.dtype != np.uint8 else lut)


def test_multi_frame_refused_or_per_frame(tmp_path):
    frames = np.stack([xray16(s) for s in range(3)])
    path = write_dicom(tmp_path / "cine.dcm", frames)
    with pytest.raises(ImageError, match=r"cine\.dcm holds 3 frames; .*--frames each") as e:
        load_image(path)
    assert e.value.reason == "multi-frame"
    sources, origin = expand_frames([str(path), str(tmp_path / "x.png")])
    assert sources[:3] == [Frame(str(path), k) for k in range(3)] and origin == [0, 0, 0, 1]
    assert str(sources[1]) == f"{path}:frame=2" and count_frames(path) == 3
    for k in range(3):
        np.testing.assert_array_equal(pixels(Frame(str(path), k)), pixels(frames[k]))
    with pytest.raises(ImageError, match="no frame 4"):
        load_image(Frame(str(path), 3))
    tiff = tmp_path / "pages.tif"
    Image.fromarray(frames[0]).save(tiff, save_all=True, append_images=[Image.fromarray(frames[1])])
    with pytest.raises(ImageError, match="holds 2 frames"):
        load_image(tiff)
    np.testing.assert_array_equal(pixels(Frame(str(tiff), 1)), pixels(frames[1]))


# ------------------------------------------------------------------------------ 16-bit images and the policy
def test_16bit_png_ramp_keeps_order_and_range(tmp_path):
    ramp = np.tile(np.linspace(0, 4095, 300).round().astype(np.uint16), (8, 1))  # 12-bit data in 16 bits
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    assert Image.open(tmp_path / "ramp.png").mode == "I;16"
    got = grey(tmp_path / "ramp.png")[0]
    assert got[0] == 0 and got[-1] == 255 and (np.diff(got.astype(int)) >= 0).all()
    assert (got == 255).mean() < 0.01  # Pillow's convert("RGB") made 99% of it white
    assert len(np.unique(got)) == 256
    x = preprocess_batch([tmp_path / "ramp.png"], **CFG)[0, 0]
    assert (np.diff(x, axis=1) >= -1e-6).all()  # the resized ramp still rises left to right


def test_same_image_as_array_png_tiff_dicom_gives_the_same_model_input(tmp_path):
    img = xray16(3)
    Image.fromarray(img).save(tmp_path / "a.png")
    Image.fromarray(img).save(tmp_path / "a.tif")
    write_dicom(tmp_path / "a.dcm", img)
    write_dicom(tmp_path / "a_no_extension", img)
    sources = [img, img[:, :, None], tmp_path / "a.png", tmp_path / "a.tif", tmp_path / "a.dcm",
               tmp_path / "a_no_extension"]
    for policy in (None, IntensityPolicy.parse("percentile:1,99"), IntensityPolicy.parse("full"),
                   IntensityPolicy.parse("window:2000,3000")):
        x = preprocess_batch(sources, **CFG, intensity=policy)
        assert np.isfinite(x).all() and x.std() > 0.1
        for i in range(1, len(sources)):
            np.testing.assert_array_equal(x[i], x[0], err_msg=f"{sources[i]} with {policy}")


def test_32bit_float_and_big_endian_files_read_like_the_array(tmp_path):
    """Pillow modes I;16B (big-endian TIFF), I (int32 TIFF) and F (float32 TIFF) hold the same values as the
    uint16 array, so every policy that does not depend on the type's range gives the same pixels."""
    img = xray16(5)
    files = {"I;16B": (img.astype(">u2"), "be16.tif"), "I": (img.astype(np.int32), "i32.tif"),
             "F": (img.astype(np.float32), "f32.tif")}
    for mode, (arr, name) in files.items():
        Image.fromarray(arr).save(tmp_path / name)
        assert Image.open(tmp_path / name).mode == mode
    for policy in (None, IntensityPolicy.parse("percentile:1,99"), IntensityPolicy.parse("window:2000,3000")):
        want = pixels(img, policy)
        assert len(np.unique(want)) > 100
        for mode, (_, name) in files.items():
            np.testing.assert_array_equal(pixels(tmp_path / name, policy), want, err_msg=f"{mode} with {policy}")
    # under "full" the type's own range applies: int32 -2^31..2^31-1, and float values beyond 0..1 are refused
    np.testing.assert_array_equal(grey(tmp_path / "i32.tif", IntensityPolicy.parse("full")),
                                  linear(img.astype(np.float64), -2.0 ** 31, 2.0 ** 31 - 1))
    with pytest.raises(ImageError, match=r"f32\.tif has values .* outside its type's range 0\.\.1"):
        load_image(tmp_path / "f32.tif", IntensityPolicy.parse("full"))


def test_split_json_lists_dicom_and_16bit_files(tmp_path):
    """A BiomedCoOp split JSON may name DICOM (with or without an extension, multi-frame with frames="each")
    and 16-bit PNG files: they decode to what load_image gives for the arrays they hold."""
    imgs = [xray16(s) for s in range(5)]
    write_dicom(tmp_path / "ct.dcm", imgs[0], RescaleSlope=2, RescaleIntercept=-1024)
    write_dicom(tmp_path / "export_0001", imgs[1])
    Image.fromarray(imgs[2]).save(tmp_path / "cxr.png")
    write_dicom(tmp_path / "cine.dcm", np.stack(imgs[3:]))
    spec = {"train": [["ct.dcm", 0, "clear"], ["export_0001", 1, "lesion"], ["cxr.png", 1, "lesion"]],
            "test": [["cine.dcm", 0, "clear"]]}
    (tmp_path / "split.json").write_text(json.dumps(spec))
    ds = read_dataset(tmp_path / "split.json", frames="each")
    assert ds.class_names == ["clear", "lesion"] and len(ds.splits["test"]) == 2
    assert ds.splits["test"].labels.tolist() == [0, 0]
    images, kept, skipped = load_images(ds.splits["train"])
    assert kept.tolist() == [0, 1, 2] and not skipped
    for im, arr in zip(images, imgs[:3]):  # minmax is affine-invariant: the rescale does not change pixels
        np.testing.assert_array_equal(np.asarray(im), pixels(arr))
    frames, _, _ = load_images(ds.splits["test"])
    for im, arr in zip(frames, imgs[3:]):
        np.testing.assert_array_equal(np.asarray(im), pixels(arr))
    with pytest.raises(DataError, match=r"cine\.dcm holds 2 frames; .*--frames each"):
        load_images(read_dataset(tmp_path / "split.json").splits["test"])


def test_evaluate_and_predict_options_resolve_against_the_checkpoint():
    """evaluate / predict: no option -> the checkpoint's policy; --dicom-voi alone replaces only its part;
    anything that differs from training warns. Old checkpoints (no record) read as the default."""
    stored = IntensityPolicy.parse("window:40,400").to_dict()

    def opts(intensity=None, dicom_voi=None):
        return argparse.Namespace(intensity=intensity, dicom_voi=dicom_voi)
    with warnings.catch_warnings():
        warnings.simplefilter("error", IntensityMismatchWarning)
        assert intensity_from_args(opts(), stored, "c.pt") == IntensityPolicy.parse("window:40,400")
        assert intensity_from_args(opts("window:40,400"), stored, "c.pt") == IntensityPolicy.parse("window:40,400")
        assert intensity_from_args(opts(), None, "old.pt") == DEFAULT_POLICY
    with pytest.warns(IntensityMismatchWarning, match="c.pt was trained with intensity policy window:40,400"):
        got = intensity_from_args(opts(dicom_voi="policy"), stored, "c.pt")
    assert got == IntensityPolicy.parse("window:40,400", dicom_voi="policy")
    with pytest.warns(IntensityMismatchWarning):
        assert intensity_from_args(opts("minmax"), stored, "c.pt") == DEFAULT_POLICY
    with pytest.raises(DataError, match="--intensity window:1 .*takes 2"):
        intensity_from_args(opts("window:1"), stored, "c.pt")


def test_policies_map_as_documented():
    rng = np.random.default_rng(7)
    v = rng.integers(0, 65536, (23, 19)).astype(np.uint16)
    f = v.astype(np.float64)
    np.testing.assert_array_equal(grey(v), linear(f, f.min(), f.max()))
    np.testing.assert_array_equal(grey(v, IntensityPolicy.parse("full")), linear(f, 0, 65535))
    lo, hi = np.percentile(f, [2, 98])
    np.testing.assert_array_equal(grey(v, IntensityPolicy.parse("percentile:2,98")),
                                  linear(f, lo, hi))
    hu = rng.integers(-1024, 3000, (17, 29)).astype(np.int16)  # CT numbers, soft-tissue window
    h = hu.astype(np.float64)
    np.testing.assert_array_equal(grey(hu, IntensityPolicy.parse("window:40,400")),
                                  linear(h, -160, 240))
    rgb16 = rng.integers(0, 4096, (9, 11, 3)).astype(np.uint16)  # colour: one mapping for all channels
    g = rgb16.astype(np.float64)
    np.testing.assert_array_equal(pixels(rgb16), linear(g, g.min(), g.max()))
    floats = rng.random((10, 10)).astype(np.float32)
    np.testing.assert_array_equal(grey(floats, IntensityPolicy.parse("full")),
                                  linear(floats.astype(np.float64), 0, 1))
    with pytest.raises(ImageError, match=r"values .* outside its type's range 0\.\.1"):
        load_image(floats * 3, IntensityPolicy.parse("full"))
    u8 = rng.integers(0, 256, (6, 7), dtype=np.uint8)  # 8-bit images are never remapped
    np.testing.assert_array_equal(grey(u8, IntensityPolicy.parse("window:10,20")), u8)
    assert grey(np.full((4, 4), 700, np.uint16)).max() == 0  # a flat image is black, not an error


def test_policy_parsing_and_records():
    p = IntensityPolicy.parse("percentile:0.5,99.5", dicom_voi="policy")
    assert str(p) == "percentile:0.5,99.5, dicom_voi=policy" and IntensityPolicy.from_dict(p.to_dict()) == p
    assert IntensityPolicy.parse(" minmax ") == DEFAULT_POLICY == resolve_policy(None, None, "old.pt")
    for text, match in (("gamma", "unknown intensity mode"), ("percentile:99,1", "LO < HI"),
                        ("window:40", "takes 2"), ("window:40,0", "width > 0"), ("full:3", "takes 0"),
                        ("window:a,b", "must be numbers")):
        with pytest.raises(ValueError, match=match):
            IntensityPolicy.parse(text)
    with pytest.raises(ValueError, match="dicom_voi"):
        IntensityPolicy("minmax", dicom_voi="yes")
    stored = IntensityPolicy.parse("window:40,400").to_dict()
    assert resolve_policy(stored, None, "m.onnx") == IntensityPolicy.parse("window:40,400")
    with pytest.warns(IntensityMismatchWarning, match="m.onnx was trained with intensity policy window:40,400"):
        assert resolve_policy(stored, DEFAULT_POLICY, "m.onnx") == DEFAULT_POLICY


# ------------------------------------------------------------------------------------------------ bad input
def _bad_files(tmp_path):
    """name -> (path, message pattern, reason)."""
    img = xray16(1)
    text = tmp_path / "notes.dcm"
    text.write_text("this is not a DICOM file at all")
    truncated = tmp_path / "cut.dcm"
    whole = write_dicom(tmp_path / "whole.dcm", img).read_bytes()
    truncated.write_bytes(whole[:len(whole) - 500])
    no_pixels = tmp_path / "nopix.dcm"
    ds = pydicom.dcmread(write_dicom(tmp_path / "tmp.dcm", img))
    del ds.PixelData
    ds.save_as(no_pixels)
    pdf = tmp_path / "report.dcm"
    ds = pydicom.dcmread(write_dicom(tmp_path / "tmp.dcm", img))
    del ds.PixelData
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.104.1"
    ds.EncapsulatedDocument, ds.MIMETypeOfEncapsulatedDocument = b"%PDF-1.4 ...", "application/pdf"
    ds.save_as(pdf)
    private_ts = write_dicom(tmp_path / "private_ts.dcm", img, transfer_syntax="1.2.826.0.1.3680043.99.1")
    empty = write_dicom(tmp_path / "empty.dcm", np.zeros((0, 4), np.uint16))
    nan_tif = tmp_path / "nan.tif"
    f = img.astype(np.float32)
    f[3, 3] = np.inf
    Image.fromarray(f).save(nan_tif)
    cases = {
        "not DICOM": (text, r"notes\.dcm is not a DICOM file", "not a DICOM file"),
        "truncated": (truncated, r"pixel data of .*cut\.dcm: truncated or damaged", "damaged pixel data"),
        "no pixel data": (no_pixels, r"nopix\.dcm has no pixel data \(Secondary Capture", "no pixel data"),
        "encapsulated": (pdf, r"report\.dcm is an encapsulated document \(Encapsulated PDF", "encapsulated document"),
        "private transfer syntax": (private_ts, r"private_ts\.dcm uses the unknown transfer syntax",
                                    "unsupported transfer syntax"),
        "empty DICOM": (empty, r"empty\.dcm is an empty image \(4x0 pixels\)", "empty image"),
        "Inf in a float TIFF": (nan_tif, r"nan\.tif has 1 NaN/Inf pixel value", "non-finite pixels"),
    }
    jpeg12 = get_testdata_file("JPGExtended.dcm", download=False)
    if jpeg12 is not None:
        try:
            pydicom.dcmread(jpeg12).pixel_array
        except (RuntimeError, NotImplementedError):  # no installed plugin decodes 12-bit JPEG
            cases["undecodable transfer syntax"] = (jpeg12, r"cannot decode the JPEG Extended .* pixel data of "
                                                            r".*JPGExtended\.dcm", "unsupported transfer syntax")
    return cases


def test_every_bad_input_is_one_clear_line(tmp_path):
    cases = _bad_files(tmp_path)
    for name, (path, match, reason) in cases.items():
        with pytest.raises(ImageError, match=match) as e:
            load_image(path)
        assert e.value.reason == reason and "\n" not in str(e.value), name
    for arr, match in ((np.zeros((0, 5), np.uint16), "empty image"), (np.zeros((4, 4, 2), np.uint16), "shape"),
                       (np.zeros((4, 4), bool), "integer or float dtype")):
        with pytest.raises(ImageError, match=match):
            load_image(arr)
    png48 = tmp_path / "rgb48.png"
    png48.write_bytes(_png48(np.arange(60, dtype=">u2").reshape(4, 5, 3) * 1000))
    with pytest.raises(ImageError, match=r"rgb48\.png is a 16-bit-per-channel RGB image"):
        load_image(png48)


def _png48(a):
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    raw = b"".join(b"\x00" + row.tobytes() for row in a)
    ihdr = struct.pack(">IIBBBBB", a.shape[1], a.shape[0], 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def test_skip_bad_images_counts_dicoms_with_reasons(tmp_path):
    cases = _bad_files(tmp_path)
    good = [write_dicom(tmp_path / f"ok{i}.dcm", xray16(i)) for i in range(2)]
    split = Split([str(p) for p in good] + [str(c[0]) for c in cases.values()], np.zeros(2 + len(cases), np.int64))
    images, kept, skipped = load_images(split, skip_bad=True)
    assert len(images) == 2 and kept.tolist() == [0, 1]
    assert [s["reason"] for s in skipped] == [c[2] for c in cases.values()]
    summary = skip_summary(skipped)
    assert summary.startswith(f"skipped {len(cases)} unreadable image(s) (") and "1 no pixel data" in summary
    assert "notes.dcm is not a DICOM file" in summary
