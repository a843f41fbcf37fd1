"""model.cuda_graph: its refusals (CPU model, CPU images, other shapes, too large a batch, a changed
model) on any machine; the capture itself, against model.classify, where CUDA exists."""
import pytest
import torch

from nearl_rt.cuda_graph import GraphStateError, batch_sizes_arg, model_state, padded_size
from tests.helpers import CLASSES, perturb_adapters, tiny

CUDA0 = torch.device("cuda", 0)


def test_cpu_model_is_refused_with_the_fix():
    model = tiny()
    model.set_classes(CLASSES)
    with pytest.raises(ValueError, match=r"need a model on a CUDA device.*model.to\('cuda'\)"):
        model.cuda_graph()
    with pytest.raises(RuntimeError, match="set_classes"):
        tiny().cuda_graph()


@pytest.mark.parametrize("sizes, expect", [((), "non-empty"), (8, "non-empty"), ((1, 0), ">= 1"),
                                           ((1, 2.5), ">= 1"), ((True,), ">= 1")])
def test_bad_batch_sizes(sizes, expect):
    with pytest.raises(ValueError, match=expect):
        batch_sizes_arg(sizes)


def test_batch_sizes_sorted_unique():
    assert batch_sizes_arg([64, 1, 8, 8]) == (1, 8, 64)


def test_padded_size_picks_the_next_captured_size():
    sizes = (1, 8, 64)
    for b, want in ((1, 1), (2, 8), (8, 8), (9, 64), (64, 64)):
        assert padded_size(torch.randn(b, 3, 4, 5), torch.device("cpu"), (3, 4, 5), sizes) == want


@pytest.mark.parametrize("images, device, expect", [
    (torch.randn(2, 3, 4, 5), CUDA0, r"on cpu but the graphs were captured on cuda:0; move them first: "
                                     r"images.to\('cuda:0'\)"),
    (torch.randn(2, 3, 4, 6), torch.device("cpu"), r"shape \(2, 3, 4, 6\).*\[B, 3, 4, 5\]"),
    (torch.randn(3, 4, 5), torch.device("cpu"), r"shape \(3, 4, 5\)"),
    ([[1.0]], CUDA0, "must be a torch.Tensor"),
])
def test_padded_size_refuses_other_devices_and_shapes(images, device, expect):
    with pytest.raises(ValueError, match=expect):
        padded_size(images, device, (3, 4, 5), (1, 8))


def test_padded_size_refuses_too_large_a_batch_and_integer_pixels():
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match=r"batch of 9 images is larger than .* \(8\).*batch_sizes=\(..., 9\)"):
        padded_size(torch.randn(9, 3, 4, 5), cpu, (3, 4, 5), (1, 8))
    with pytest.raises(ValueError, match="floating point"):
        padded_size(torch.zeros(1, 3, 4, 5, dtype=torch.uint8), cpu, (3, 4, 5), (1, 8))


def test_model_state_sees_every_change_that_would_make_a_graph_stale():
    model = tiny("text_cacheable")
    model.set_classes(CLASSES)
    before = model_state(model)
    with torch.no_grad():
        model.classify(torch.randn(2, 3, 32, 32))
    assert model_state(model) == before, "running the model is not a change"
    changes = {
        "adapter weights loaded": lambda m: m.load_adapter_state_dict(perturb_adapters(tiny("text_cacheable"))
                                                                       .adapter_state_dict()),
        "classes set again": lambda m: m.set_classes(CLASSES[:2]),
        "dtype": lambda m: m.to(torch.float64),
        "backend": lambda m: setattr(m, "backend", "torch"),
        "a weight edited in place": lambda m: m.oca_v[0].scale.add_(1),
    }
    for what, change in changes.items():
        state = model_state(model)
        with torch.no_grad():
            change(model)
        assert model_state(model) != state, what


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-graph capture needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["text_cacheable", "bidirectional"])
def test_graphs_replay_classify_and_refuse_stale_state(mode):
    model = perturb_adapters(tiny(mode)).cuda()
    model.set_classes(CLASSES)
    graphed = model.cuda_graph(batch_sizes=(1, 4))
    g = torch.Generator().manual_seed(3)
    for b in (1, 3, 4):  # 3 is padded to 4
        x = torch.randn(b, 3, 32, 32, generator=g).cuda()
        with torch.no_grad():
            want = model.classify(x)
        got = graphed(x)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # same kernels, fp32
    with pytest.raises(ValueError, match="move them first"):
        graphed(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="larger than the largest captured"):
        graphed(torch.randn(5, 3, 32, 32).cuda())
    model.set_classes(CLASSES[:2])
    with pytest.raises(GraphStateError, match="capture again"):
        graphed(torch.randn(1, 3, 32, 32).cuda())
