"""fp16 by ONNX-level conversion of the fp32 export, with the fp32 rules written as data."""

from __future__ import annotations

import onnx

# Inputs that stay float32 in every export (the IO table's fixed "float32" entries).
FP32_INPUTS = {"unet": ["timestep"]}

# The timestep embedding (Sin/Cos of up to 999 * frequencies) stays fp32 up to the first of these,
# as diffusers computes it; the projection after it runs in fp16.
TIMESTEP_PATH_STOPS = {"MatMul", "Gemm"}

# With `upcast_attention`, diffusers computes Q.K^T, its scaling and the softmax in fp32.
ATTENTION_SCORE_OPS = {"Mul", "Div", "Add", "Where", "Cast"}


def timestep_path(graph: onnx.GraphProto, input_name: str = "timestep") -> list[str]:
    """Nodes downstream of `timestep` up to (not including) the first MatMul/Gemm."""
    frontier = {input_name}
    blocked = []
    for node in graph.node:  # the exported graph is topologically sorted
        if node.op_type in TIMESTEP_PATH_STOPS or not frontier.intersection(node.input):
            continue
        blocked.append(node.name)
        frontier.update(node.output)
    return blocked


def attention_score_nodes(graph: onnx.GraphProto) -> list[str]:
    """Each Softmax, the scaling ops before it and the MatMul that makes the scores."""
    producer = {out: node for node in graph.node for out in node.output}
    blocked = []
    for node in graph.node:
        if node.op_type != "Softmax":
            continue
        blocked.append(node.name)
        current = producer.get(node.input[0])
        while current is not None and current.op_type in ATTENTION_SCORE_OPS:
            blocked.append(current.name)
            current = producer.get(current.input[0])
        if current is not None and current.op_type == "MatMul":
            blocked.append(current.name)
    return blocked


def fp32_nodes(component: str, model: onnx.ModelProto, upcast_attention: bool) -> list[str]:
    """The nodes an fp16 export keeps in fp32, by the rules above."""
    nodes = []
    if component == "unet":
        nodes += timestep_path(model.graph)
        if upcast_attention:
            nodes += attention_score_nodes(model.graph)
    return list(dict.fromkeys(nodes))


def to_fp16(component: str, model: onnx.ModelProto, keep_fp32_nodes: list[str]) -> onnx.ModelProto:
    """Convert an fp32 model to fp16, keeping the given nodes and the fixed fp32 inputs in fp32."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from .export import is_large

    return convert_float_to_float16(
        model,
        keep_io_types=FP32_INPUTS.get(component, []),
        node_block_list=keep_fp32_nodes,
        disable_shape_infer=is_large(model),
    )
