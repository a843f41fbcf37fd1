"""nearl_rt.bench.ort_profile: node times grouped by the module that exported each node."""
import json

import pytest

from nearl_rt.core.errors import NearlError
from nearl_rt.bench.ort_profile import GROUPS, main, module_group, node_groups, profile
from tests.export_cases import exported


@pytest.mark.parametrize("scope, group", [
    ("model.backbone.visual.transformer.resblocks.3", "image tower"), ("model.backbone.visual.conv1", "image tower"),
    ("model.backbone.transformer.resblocks.11.ln_1", "text tower"), ("model.backbone.ln_final", "text tower"),
    ("model.oca_v.4", "OCA (image)"), ("model.oca_t.0", "OCA (text)"), ("model.use.q_proj", "USEformer"),
    ("model.use.mlp.2", "USEformer"), ("logits", "other"),
])
def test_module_group(scope, group):
    assert module_group(scope) == group


@pytest.mark.parametrize("fused", [False, True])
def test_every_part_of_a_bidirectional_model_is_found(fused):
    import onnx
    path = exported("bidirectional", fused=fused)
    groups = node_groups(onnx.load(str(path), load_external_data=False).graph)
    assert set(groups.values()) == set(GROUPS)  # the metadata names every module of the model
    result = profile(path, batch_size=2, runs=2, threads=1)
    assert set(result["kernel_ms"]) == set(GROUPS)
    assert all(result["kernel_ms"][g] > 0 for g in GROUPS), result["kernel_ms"]
    assert result["nodes"] > 0 and result["wall_ms"] > 0


def test_cli_writes_table_and_json(tmp_path, capsys):
    out = tmp_path / "profile.json"
    assert main([str(exported("text_cacheable")), "--runs", "1", "--threads", "1", "--out", str(out)]) == 0
    assert "| file | B | wall ms |" in capsys.readouterr().out
    (result,) = json.loads(out.read_text())
    assert result["runs"] == 1 and sum(result["kernel_ms"].values()) > 0
    with pytest.raises(SystemExit):
        main([str(tmp_path / "missing.onnx")])
    (tmp_path / "bad.onnx").write_bytes(b"not onnx")
    with pytest.raises(NearlError, match="cannot read .*bad.onnx as ONNX"):
        main([str(tmp_path / "bad.onnx")])
