"""What the TensorRT 10 ONNX parser documents it accepts: the one table `trt_lint` checks graphs against.

Sources (read for facts, nothing copied):

* ``onnx/onnx-tensorrt`` ``docs/operators.md`` at commit 96e7811 (2024-06-17, the TensorRT 10.x
  branch): "TensorRT 10.0 supports operators in the inclusive range of opset 9 to opset 20";
  quantized types INT8, FP8 and INT4 "only through quantization from a floating-point type";
  DequantizeLinear takes INT8, FP8, INT4 and QuantizeLinear FP32/FP16/BF16 inputs, both with a
  zero point of 0. OPERATORS below is every row of that table marked supported.
* the same commit's ``onnxOpImporters.cpp`` (``QuantDequantLinearHelper``): constant scales
  must all be positive; a scale of dynamic shape is refused; a per-axis scale is taken for
  weights only ("Activations-quantization does not support per-axis quantization"); a
  blocked scale has the input's rank with exactly one blocked axis (the block is inferred from
  the shapes; the ``block_size`` attribute is not read); UINT8 zero points are replaced by INT8
  with a warning and any non-zero zero point is an error; INT4 needs an even last dimension.
* ``ModelImporter.cpp`` there refuses only opsets below 7; an opset-21 graph is parsed, but
  21 is outside the documented range. INT4 block Q/DQ exists in ONNX only from opset 21, so a
  graph with int4 weights is written at 21 and the lint reports that as a note, not an error.
* TensorRT 11's "ONNX Opset Guide" (docs.nvidia.com) documents opsets up to 25.
"""

from __future__ import annotations

MIN_OPSET = 9
MAX_OPSET = 20  # TensorRT 10.0's documented maximum
BLOCK_OPSET = 21  # DequantizeLinear block_size and INT4 / UINT4 (ONNX); TensorRT parses it for INT4 weights
QUANTIZED_TYPES = ("INT8", "FLOAT8E4M3FN", "INT4")  # ONNX names of TensorRT's quantized types
WEIGHT_ONLY_TYPES = ("INT4",)  # TensorRT quantizes these only as weights: DQ of an initializer, no Q

OPERATORS = frozenset({
    "Abs", "Acos", "Acosh", "Add", "And", "ArgMax", "ArgMin", "Asin", "Asinh", "Atan", "Atanh", "AveragePool",
    "BatchNormalization", "Cast", "CastLike", "Ceil", "Celu", "Clip", "Concat", "Constant", "ConstantOfShape",
    "Conv", "ConvTranspose", "Cos", "Cosh", "CumSum", "DeformConv", "DepthToSpace", "DequantizeLinear", "Div",
    "Dropout", "Einsum", "Elu", "Equal", "Erf", "Exp", "Expand", "EyeLike", "Flatten", "Floor", "GRU", "Gather",
    "GatherElements", "GatherND", "Gelu", "Gemm", "GlobalAveragePool", "GlobalLpPool", "GlobalMaxPool", "Greater",
    "GreaterOrEqual", "GridSample", "GroupNormalization", "HardSigmoid", "HardSwish", "Hardmax", "Identity", "If",
    "ImageScaler", "InstanceNormalization", "IsInf", "IsNaN", "LRN", "LSTM", "LayerNormalization", "LeakyRelu",
    "Less", "LessOrEqual", "Log", "LogSoftmax", "Loop", "LpNormalization", "LpPool", "MatMul", "Max", "MaxPool",
    "Mean", "MeanVarianceNormalization", "Min", "Mish", "Mod", "Mul", "Neg", "NonMaxSuppression", "NonZero", "Not",
    "OneHot", "Or", "PRelu", "Pad", "ParametricSoftplus", "Pow", "QuantizeLinear", "RNN", "RandomNormal",
    "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Range", "Reciprocal", "ReduceL1", "ReduceL2",
    "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum",
    "ReduceSumSquare", "Relu", "Reshape", "Resize", "ReverseSequence", "RoiAlign", "Round", "ScaledTanh", "Scan",
    "Scatter", "ScatterElements", "ScatterND", "Selu", "Shape", "Shrink", "Sigmoid", "Sign", "Sin", "Sinh", "Size",
    "Slice", "Softmax", "Softplus", "Softsign", "SpaceToDepth", "Split", "Sqrt", "Squeeze", "Sub", "Sum", "Tan",
    "Tanh", "ThresholdedRelu", "Tile", "TopK", "Transpose", "Trilu", "Unsqueeze", "Upsample", "Where", "Xor",
})  # fmt: skip
