"""Saliency maps (nearl_rt.saliency, predict --explain) and the deletion test (nearl_rt.faithfulness).

The faithfulness tests use the bench's synthetic set: the class "a bright square" is a bright square at a random
position in noise, and a tiny model's adapters learn it in seconds (docs/explain.md has the measured rates)."""
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import nearl_rt
from nearl_rt import predict
from nearl_rt.bench.explain import bright_patch_model, bright_patch_report
from nearl_rt.classifier import Classifier
from nearl_rt.core.errors import NearlError
from nearl_rt.faithfulness import delete_patches, patch_scores
from nearl_rt.saliency import METHODS, saliency_maps, to_image_geometry
from tests.helpers import cli, perturb_adapters, tiny

DEMO_DATA = nearl_rt.__path__[0] + "/demo_data"
# measured on the bench's set (seed 0 model, 32 test images with a square): integrated gradients 75 %,
# occlusion 78 %, Grad-CAM 0 % (docs/explain.md); chance (the square's share of the crop) is about 14 %
PEAK_IN_SQUARE = {"integrated_gradients": 0.6, "occlusion": 0.6}


@pytest.fixture(scope="module")
def square_report():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = bright_patch_model("tiny", "bidirectional")
    return bright_patch_report(model, methods=tuple(PEAK_IN_SQUARE))


def test_the_tiny_model_learnt_the_square(square_report):
    assert square_report["accuracy"] >= 0.9


@pytest.mark.parametrize("method", sorted(PEAK_IN_SQUARE))
def test_the_saliency_peak_falls_inside_the_square(square_report, method):
    assert square_report[method]["peak_in_square"] >= PEAK_IN_SQUARE[method]


@pytest.mark.parametrize("method", sorted(PEAK_IN_SQUARE))
def test_deleting_salient_patches_drops_the_class_more_than_random_ones(square_report, method):
    for fraction, s in square_report[method]["deletion"].items():
        assert s["salient"] > s["random"] + 0.02, (fraction, s)
        assert s["salient_larger"] >= 0.75, (fraction, s)


def explained_model(preset, interaction):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", nearl_rt.RandomBackboneWarning)
        model = perturb_adapters(tiny(interaction, preset), seed=3).eval()
    model.set_classes(["normal", "pneumonia"], "a chest x-ray showing {}.")
    return model


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, [p.requires_grad for p in model.parameters()],
            [m.training for m in model.modules()])


@pytest.mark.parametrize("preset,interaction", [("tiny", "bidirectional"), ("tiny", "text_cacheable"),
                                                ("tiny_bert", "bidirectional")])
@pytest.mark.parametrize("method", METHODS)
def test_maps_are_deterministic_in_the_image_geometry_and_leave_the_model_unchanged(preset, interaction, method):
    model = explained_model(preset, interaction)
    before = snapshot(model)
    image = np.random.default_rng(5).integers(0, 256, (40, 56), dtype=np.uint8)  # rows, columns: not square
    first = nearl_rt.explain(model, image, method=method)
    again = nearl_rt.explain(model, image, method=method)
    assert first.saliency.shape == (40, 56) and first.saliency.dtype == np.float32
    assert np.isfinite(first.saliency).all() and first.saliency.min() >= 0 and first.saliency.max() <= 1
    # some evidence for the predicted class; occlusion's map is all 0 (as documented) when hiding no single patch
    # lowers the class's probability, which happens on this random model with tiny_bert
    assert first.saliency.max() > 0 or method == "occlusion"
    np.testing.assert_array_equal(first.saliency, again.saliency)
    after = snapshot(model)
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0]) and before[1:] == after[1:]
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        probs = torch.softmax(Classifier(model).logits(
            nearl_rt.data.Preprocess(model.preprocess_cfg).eval([first.image])), -1)[0]
    assert first.class_name == model.class_names[int(probs.argmax())]
    assert first.probability == pytest.approx(float(probs.max()), abs=1e-5)


def test_explaining_a_model_in_train_mode_keeps_its_modes_and_uses_no_dropout():
    model = explained_model("tiny", "bidirectional")
    image = np.random.default_rng(6).integers(0, 256, (32, 32), dtype=np.uint8)
    in_eval = nearl_rt.explain(model, image, class_name="pneumonia").saliency
    model.train()
    modes = [m.training for m in model.modules()]
    np.testing.assert_array_equal(nearl_rt.explain(model, image, class_name="pneumonia").saliency, in_eval)
    assert [m.training for m in model.modules()] == modes


def test_to_image_geometry_undoes_the_resize_and_centre_crop():
    """A model-input map with one hot column maps to the column of the original image it was cropped from."""
    m = np.zeros((32, 32), np.float32)
    m[:, 0] = 1.0  # the crop's first column: column (64 - 32) / 2 = 16 of the 64 x 32 resize of an 80 x 40 image,
    out = to_image_geometry(m, (80, 40))  # (width, height); i.e. column 16 * 80 / 64 = 20 of the image
    assert out.shape == (40, 80)
    assert (out.argmax(axis=1) == 20).all() and out[:, :18].max() == 0 and out[:, 23:].max() == 0


def test_deletion_removes_exactly_the_chosen_patches_row_major():
    images = torch.randn(2, 3, 16, 24)
    out = delete_patches(images, [np.array([0, 4]), np.array([], np.int64)], (8, 8))  # 2 x 3 patches of 8 x 8
    assert (out[0, :, :8, :8] == 0).all() and (out[0, :, 8:, 8:16] == 0).all()
    kept = torch.ones(2, 3, 16, 24, dtype=torch.bool)
    kept[0, :, :8, :8] = kept[0, :, 8:, 8:16] = False
    assert torch.equal(out[kept], images[kept])
    maps = np.zeros((1, 16, 24), np.float32)
    maps[0, 8:, 16:] = 1.0  # the last patch of the second row
    assert patch_scores(maps, (8, 8)).argmax() == 5


def test_bad_input_is_one_clear_line(tmp_path):
    model = explained_model("tiny", "bidirectional")
    image = np.zeros((32, 32), np.uint8)
    with pytest.raises(NearlError, match="'effusion' is not one of the model's classes"):
        nearl_rt.explain(model, image, class_name="effusion")
    with pytest.raises(NearlError, match="need the model's checkpoint"):
        nearl_rt.explain(tmp_path / "model.onnx", image)
    with pytest.raises(NearlError, match="saliency method 'rollout' is unknown"):
        nearl_rt.explain(model, image, method="rollout")
    with pytest.raises(ValueError, match="multiples of the patch size"):
        saliency_maps(Classifier(model), torch.zeros(1, 3, 30, 30), [0])


def test_predict_explain_on_the_demo_x_rays_and_a_dicom(tmp_path, capsys):
    from pydicom.data import get_testdata_file
    model = explained_model("tiny", "bidirectional")
    ckpt = nearl_rt.save_checkpoint(model, tmp_path / "c.pt")
    dicom = get_testdata_file("CT_small.dcm")  # 16-bit CT: the intensity policy maps it to 0..255
    out = tmp_path / "maps"
    rc, stdout, err = cli(predict, [ckpt, DEMO_DATA + "/test/normal", dicom, "--explain", out, "--class", "pneumonia"],
                          capsys)
    assert rc == 0, err
    pngs, maps = sorted(out.glob("*.png")), sorted(out.glob("*.npy"))
    assert len(pngs) == len(maps) == len(stdout.splitlines()) - 1  # one per CSV row
    for png, npy in zip(pngs, maps):
        with Image.open(png) as im:
            im.load()
        saliency = np.load(npy)
        assert saliency.ndim == 2 and np.isfinite(saliency).all() and 0 <= saliency.min() <= saliency.max() <= 1
    assert np.load(maps[-1]).shape == (128, 128)  # the DICOM's own geometry
    from_path = nearl_rt.explain(ckpt, dicom, class_name="pneumonia")  # the checkpoint's policy and calibration
    np.testing.assert_allclose(from_path.saliency, np.load(maps[-1]), atol=1e-6)
    rc, _, err = cli(predict, [ckpt, dicom, "--explain", out, "--class", "effusion"], capsys)
    assert rc != 0 and len(err.strip().splitlines()) == 1 and "effusion" in err
    rc, _, err = cli(predict, [tmp_path / "c.onnx", dicom, "--explain", out], capsys)
    assert rc != 0 and len(err.strip().splitlines()) == 1 and "checkpoint" in err
