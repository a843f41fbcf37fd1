"""A Python-backend stand-in for Triton's onnxruntime backend (tests/test_serve.py): runs the version
directory's model.onnx with onnxruntime on CPU, request by request, tensors by the graph's names. The
config.pbtxt beside it is export.triton's, with only `backend: "python"` changed, so Triton's own checks
(dims, batching, ensemble wiring) judge the production configuration."""
import os

import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def execute(self, requests):
        responses = []
        for request in requests:
            feeds = {n: pb_utils.get_input_tensor_by_name(request, n).as_numpy() for n in self.inputs}
            results = self.session.run(self.outputs, feeds)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(n, r) for n, r in zip(self.outputs, results)]))
        return responses
