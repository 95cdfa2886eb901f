import numpy as np
import pytest
from onnx import TensorProto, helper

from models.onnx_session import onnx_session


def _relu_graph() -> bytes:
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def _entry(session, key: str) -> str | None:
    try:
        return session.get_session_options().get_session_config_entry(key)
    except RuntimeError:  # ORT raises for a key never set
        return None


def test_spin_modes_set_the_runtime_options():
    always, never, in_run = (onnx_session(_relu_graph(), threads=2, spin=m) for m in ("always", "never", "in_run"))
    assert _entry(always, "session.intra_op.allow_spinning") is None and _entry(always, "session.force_spinning_stop") is None
    assert _entry(never, "session.intra_op.allow_spinning") == "0"
    assert _entry(in_run, "session.intra_op.allow_spinning") is None  # ORT's default: spin between nodes...
    assert _entry(in_run, "session.force_spinning_stop") == "1"  # ...and stop when the run ends
    opts = in_run.get_session_options()
    assert opts.intra_op_num_threads == 2 and not opts.enable_mem_pattern
    x = np.array([[-1.0, 0.5, 2.0]], np.float32)
    for s in (always, never, in_run):
        np.testing.assert_array_equal(s.run(None, {"x": x})[0], [[0.0, 0.5, 2.0]])


def test_an_unknown_spin_mode_is_refused():
    with pytest.raises(ValueError, match="spin must be one of"):
        onnx_session(_relu_graph(), threads=1, spin="sometimes")
