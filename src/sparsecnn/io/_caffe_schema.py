"""The slice of BVLC ``caffe.proto`` that sparsecnn reads and writes, built in Python.

No ``protoc`` and no ``caffe_pb2`` are needed: the messages below are declared as a
``FileDescriptorProto`` with BVLC's field numbers, types and defaults (``src/caffe/proto/caffe.proto``
of BVLC/caffe master), registered in a private descriptor pool (so a real ``caffe_pb2`` imported in the
same process does not clash), and turned into message classes. Only the fields the importer needs are
declared; the binary parser keeps any other field as an unknown field and the text parser is told to
skip unknown fields, so real deploy prototxts and ``.caffemodel`` files parse unchanged.

Exports ``NetParameter``, ``LayerParameter``, ``V1LayerParameter``, ``BlobProto``, ``BlobShape`` and
``V1_TYPE_NAMES`` (legacy ``V1LayerParameter.LayerType`` enum name -> current layer type string).
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

__all__ = ["V1_TYPE_NAMES", "BlobProto", "BlobShape", "LayerParameter", "NetParameter", "V1LayerParameter"]

_F = descriptor_pb2.FieldDescriptorProto
_OPT, _REP = _F.LABEL_OPTIONAL, _F.LABEL_REPEATED
_SCALARS = {
    "int32": _F.TYPE_INT32,
    "int64": _F.TYPE_INT64,
    "uint32": _F.TYPE_UINT32,
    "float": _F.TYPE_FLOAT,
    "double": _F.TYPE_DOUBLE,
    "bool": _F.TYPE_BOOL,
    "string": _F.TYPE_STRING,
}

# Legacy V1LayerParameter.LayerType: enum value and the current type string Caffe upgrades it to
# (caffe/src/caffe/util/upgrade_proto.cpp, UpgradeV1LayerType).
_V1_TYPES: dict[str, tuple[int, str]] = {
    "NONE": (0, ""),
    "ABSVAL": (35, "AbsVal"),
    "ACCURACY": (1, "Accuracy"),
    "ARGMAX": (30, "ArgMax"),
    "BNLL": (2, "BNLL"),
    "CONCAT": (3, "Concat"),
    "CONTRASTIVE_LOSS": (37, "ContrastiveLoss"),
    "CONVOLUTION": (4, "Convolution"),
    "DATA": (5, "Data"),
    "DECONVOLUTION": (39, "Deconvolution"),
    "DROPOUT": (6, "Dropout"),
    "DUMMY_DATA": (32, "DummyData"),
    "EUCLIDEAN_LOSS": (7, "EuclideanLoss"),
    "ELTWISE": (25, "Eltwise"),
    "EXP": (38, "Exp"),
    "FLATTEN": (8, "Flatten"),
    "HDF5_DATA": (9, "HDF5Data"),
    "HDF5_OUTPUT": (10, "HDF5Output"),
    "HINGE_LOSS": (28, "HingeLoss"),
    "IM2COL": (11, "Im2col"),
    "IMAGE_DATA": (12, "ImageData"),
    "INFOGAIN_LOSS": (13, "InfogainLoss"),
    "INNER_PRODUCT": (14, "InnerProduct"),
    "LRN": (15, "LRN"),
    "MEMORY_DATA": (29, "MemoryData"),
    "MULTINOMIAL_LOGISTIC_LOSS": (16, "MultinomialLogisticLoss"),
    "MVN": (34, "MVN"),
    "POOLING": (17, "Pooling"),
    "POWER": (26, "Power"),
    "RELU": (18, "ReLU"),
    "SIGMOID": (19, "Sigmoid"),
    "SIGMOID_CROSS_ENTROPY_LOSS": (27, "SigmoidCrossEntropyLoss"),
    "SILENCE": (36, "Silence"),
    "SOFTMAX": (20, "Softmax"),
    "SOFTMAX_LOSS": (21, "SoftmaxWithLoss"),
    "SPLIT": (22, "Split"),
    "SLICE": (33, "Slice"),
    "TANH": (23, "TanH"),
    "WINDOW_DATA": (24, "WindowData"),
    "THRESHOLD": (31, "Threshold"),
}
V1_TYPE_NAMES: dict[str, str] = {name: new for name, (_, new) in _V1_TYPES.items()}


def _field(msg, name, number, kind, label=_OPT, default=None, packed=False):
    f = msg.field.add(name=name, number=number, label=label)
    if kind in _SCALARS:
        f.type = _SCALARS[kind]
    elif kind.startswith("enum:"):
        f.type, f.type_name = _F.TYPE_ENUM, "." + kind[5:]
    else:
        f.type, f.type_name = _F.TYPE_MESSAGE, "." + kind
    if default is not None:
        f.default_value = default
    if packed:
        f.options.packed = True


def _enum(parent, name, values):
    e = parent.enum_type.add(name=name)
    for key, number in values:
        e.value.add(name=key, number=number)


def _build() -> descriptor_pb2.FileDescriptorProto:
    fd = descriptor_pb2.FileDescriptorProto(
        name="sparsecnn/caffe_subset.proto", package="caffe", syntax="proto2"
    )
    _enum(fd, "Phase", [("TRAIN", 0), ("TEST", 1)])
    msgs: dict[str, descriptor_pb2.DescriptorProto] = {}

    def message(name):
        msgs[name] = fd.message_type.add(name=name)
        return msgs[name]

    m = message("BlobShape")
    _field(m, "dim", 1, "int64", _REP, packed=True)

    m = message("BlobProto")
    _field(m, "shape", 7, "caffe.BlobShape")
    _field(m, "data", 5, "float", _REP, packed=True)
    _field(m, "diff", 6, "float", _REP, packed=True)
    _field(m, "double_data", 8, "double", _REP, packed=True)
    _field(m, "double_diff", 9, "double", _REP, packed=True)
    for i, key in enumerate(("num", "channels", "height", "width"), start=1):  # legacy 4-D shape
        _field(m, key, i, "int32", default="0")

    m = message("NetState")
    _field(m, "phase", 1, "enum:caffe.Phase", default="TEST")
    _field(m, "level", 2, "int32", default="0")
    _field(m, "stage", 3, "string", _REP)

    m = message("NetStateRule")
    _field(m, "phase", 1, "enum:caffe.Phase")
    _field(m, "min_level", 2, "int32")
    _field(m, "max_level", 3, "int32")
    _field(m, "stage", 4, "string", _REP)
    _field(m, "not_stage", 5, "string", _REP)

    m = message("ParamSpec")
    _enum(m, "DimCheckMode", [("STRICT", 0), ("PERMISSIVE", 1)])
    _field(m, "name", 1, "string")
    _field(m, "share_mode", 2, "enum:caffe.ParamSpec.DimCheckMode")
    _field(m, "lr_mult", 3, "float", default="1")
    _field(m, "decay_mult", 4, "float", default="1")

    m = message("FillerParameter")
    _enum(m, "VarianceNorm", [("FAN_IN", 0), ("FAN_OUT", 1), ("AVERAGE", 2)])
    _field(m, "type", 1, "string", default="constant")
    _field(m, "value", 2, "float", default="0")
    _field(m, "min", 3, "float", default="0")
    _field(m, "max", 4, "float", default="1")
    _field(m, "mean", 5, "float", default="0")
    _field(m, "std", 6, "float", default="1")
    _field(m, "sparse", 7, "int32", default="-1")
    _field(m, "variance_norm", 8, "enum:caffe.FillerParameter.VarianceNorm", default="FAN_IN")

    m = message("NetParameter")
    _field(m, "name", 1, "string")
    _field(m, "input", 3, "string", _REP)
    _field(m, "input_shape", 8, "caffe.BlobShape", _REP)
    _field(m, "input_dim", 4, "int32", _REP)
    _field(m, "force_backward", 5, "bool", default="false")
    _field(m, "state", 6, "caffe.NetState")
    _field(m, "debug_info", 7, "bool", default="false")
    _field(m, "layer", 100, "caffe.LayerParameter", _REP)
    _field(m, "layers", 2, "caffe.V1LayerParameter", _REP)

    m = message("BatchNormParameter")
    _field(m, "use_global_stats", 1, "bool")
    _field(m, "moving_average_fraction", 2, "float", default="0.999")
    _field(m, "eps", 3, "float", default="1e-05")

    m = message("ConcatParameter")
    _field(m, "axis", 2, "int32", default="1")
    _field(m, "concat_dim", 1, "uint32", default="1")

    engine = [("DEFAULT", 0), ("CAFFE", 1), ("CUDNN", 2)]
    m = message("ConvolutionParameter")
    _enum(m, "Engine", engine)
    _field(m, "num_output", 1, "uint32")
    _field(m, "bias_term", 2, "bool", default="true")
    _field(m, "pad", 3, "uint32", _REP)
    _field(m, "kernel_size", 4, "uint32", _REP)
    _field(m, "stride", 6, "uint32", _REP)
    _field(m, "dilation", 18, "uint32", _REP)
    _field(m, "pad_h", 9, "uint32", default="0")
    _field(m, "pad_w", 10, "uint32", default="0")
    _field(m, "kernel_h", 11, "uint32")
    _field(m, "kernel_w", 12, "uint32")
    _field(m, "stride_h", 13, "uint32")
    _field(m, "stride_w", 14, "uint32")
    _field(m, "group", 5, "uint32", default="1")
    _field(m, "weight_filler", 7, "caffe.FillerParameter")
    _field(m, "bias_filler", 8, "caffe.FillerParameter")
    _field(m, "engine", 15, "enum:caffe.ConvolutionParameter.Engine", default="DEFAULT")
    _field(m, "axis", 16, "int32", default="1")
    _field(m, "force_nd_im2col", 17, "bool", default="false")

    m = message("DropoutParameter")
    _field(m, "dropout_ratio", 1, "float", default="0.5")

    m = message("EltwiseParameter")
    _enum(m, "EltwiseOp", [("PROD", 0), ("SUM", 1), ("MAX", 2)])
    _field(m, "operation", 1, "enum:caffe.EltwiseParameter.EltwiseOp", default="SUM")
    _field(m, "coeff", 2, "float", _REP)
    _field(m, "stable_prod_grad", 3, "bool", default="true")

    m = message("FlattenParameter")
    _field(m, "axis", 1, "int32", default="1")
    _field(m, "end_axis", 2, "int32", default="-1")

    m = message("InnerProductParameter")
    _field(m, "num_output", 1, "uint32")
    _field(m, "bias_term", 2, "bool", default="true")
    _field(m, "weight_filler", 3, "caffe.FillerParameter")
    _field(m, "bias_filler", 4, "caffe.FillerParameter")
    _field(m, "axis", 5, "int32", default="1")
    _field(m, "transpose", 6, "bool", default="false")

    m = message("InputParameter")
    _field(m, "shape", 1, "caffe.BlobShape", _REP)

    m = message("LRNParameter")
    _enum(m, "NormRegion", [("ACROSS_CHANNELS", 0), ("WITHIN_CHANNEL", 1)])
    _enum(m, "Engine", engine)
    _field(m, "local_size", 1, "uint32", default="5")
    _field(m, "alpha", 2, "float", default="1")
    _field(m, "beta", 3, "float", default="0.75")
    _field(m, "norm_region", 4, "enum:caffe.LRNParameter.NormRegion", default="ACROSS_CHANNELS")
    _field(m, "k", 5, "float", default="1")
    _field(m, "engine", 6, "enum:caffe.LRNParameter.Engine", default="DEFAULT")

    m = message("PoolingParameter")
    _enum(m, "PoolMethod", [("MAX", 0), ("AVE", 1), ("STOCHASTIC", 2)])
    _enum(m, "Engine", engine)
    _enum(m, "RoundMode", [("CEIL", 0), ("FLOOR", 1)])
    _field(m, "pool", 1, "enum:caffe.PoolingParameter.PoolMethod", default="MAX")
    _field(m, "pad", 4, "uint32", default="0")
    _field(m, "pad_h", 9, "uint32", default="0")
    _field(m, "pad_w", 10, "uint32", default="0")
    _field(m, "kernel_size", 2, "uint32")
    _field(m, "kernel_h", 5, "uint32")
    _field(m, "kernel_w", 6, "uint32")
    _field(m, "stride", 3, "uint32", default="1")
    _field(m, "stride_h", 7, "uint32")
    _field(m, "stride_w", 8, "uint32")
    _field(m, "engine", 11, "enum:caffe.PoolingParameter.Engine", default="DEFAULT")
    _field(m, "global_pooling", 12, "bool", default="false")
    _field(m, "round_mode", 13, "enum:caffe.PoolingParameter.RoundMode", default="CEIL")

    m = message("ReLUParameter")
    _enum(m, "Engine", engine)
    _field(m, "negative_slope", 1, "float", default="0")
    _field(m, "engine", 2, "enum:caffe.ReLUParameter.Engine", default="DEFAULT")

    m = message("ScaleParameter")
    _field(m, "axis", 1, "int32", default="1")
    _field(m, "num_axes", 2, "int32", default="1")
    _field(m, "filler", 3, "caffe.FillerParameter")
    _field(m, "bias_term", 4, "bool", default="false")
    _field(m, "bias_filler", 5, "caffe.FillerParameter")

    m = message("SoftmaxParameter")
    _enum(m, "Engine", engine)
    _field(m, "engine", 1, "enum:caffe.SoftmaxParameter.Engine", default="DEFAULT")
    _field(m, "axis", 2, "int32", default="1")

    layer_params = [  # (field, message, LayerParameter number, V1LayerParameter number or None)
        ("batch_norm_param", "BatchNormParameter", 139, None),
        ("concat_param", "ConcatParameter", 104, 9),
        ("convolution_param", "ConvolutionParameter", 106, 10),
        ("dropout_param", "DropoutParameter", 108, 12),
        ("eltwise_param", "EltwiseParameter", 110, 24),
        ("flatten_param", "FlattenParameter", 135, None),
        ("inner_product_param", "InnerProductParameter", 117, 17),
        ("input_param", "InputParameter", 143, None),
        ("lrn_param", "LRNParameter", 118, 18),
        ("pooling_param", "PoolingParameter", 121, 19),
        ("relu_param", "ReLUParameter", 123, 30),
        ("scale_param", "ScaleParameter", 142, None),
        ("softmax_param", "SoftmaxParameter", 125, 39),
    ]

    m = message("LayerParameter")
    _field(m, "name", 1, "string")
    _field(m, "type", 2, "string")
    _field(m, "bottom", 3, "string", _REP)
    _field(m, "top", 4, "string", _REP)
    _field(m, "phase", 10, "enum:caffe.Phase")
    _field(m, "loss_weight", 5, "float", _REP)
    _field(m, "param", 6, "caffe.ParamSpec", _REP)
    _field(m, "blobs", 7, "caffe.BlobProto", _REP)
    _field(m, "propagate_down", 11, "bool", _REP)
    _field(m, "include", 8, "caffe.NetStateRule", _REP)
    _field(m, "exclude", 9, "caffe.NetStateRule", _REP)
    for key, kind, number, _ in layer_params:
        _field(m, key, number, "caffe." + kind)

    m = message("V1LayerParameter")
    _enum(m, "LayerType", [(name, number) for name, (number, _) in _V1_TYPES.items()])
    _enum(m, "DimCheckMode", [("STRICT", 0), ("PERMISSIVE", 1)])
    _field(m, "bottom", 2, "string", _REP)
    _field(m, "top", 3, "string", _REP)
    _field(m, "name", 4, "string")
    _field(m, "include", 32, "caffe.NetStateRule", _REP)
    _field(m, "exclude", 33, "caffe.NetStateRule", _REP)
    _field(m, "type", 5, "enum:caffe.V1LayerParameter.LayerType")
    _field(m, "blobs", 6, "caffe.BlobProto", _REP)
    _field(m, "param", 1001, "string", _REP)
    _field(m, "blob_share_mode", 1002, "enum:caffe.V1LayerParameter.DimCheckMode", _REP)
    _field(m, "blobs_lr", 7, "float", _REP)
    _field(m, "weight_decay", 8, "float", _REP)
    _field(m, "loss_weight", 35, "float", _REP)
    for key, kind, _, number in layer_params:
        if number is not None:
            _field(m, key, number, "caffe." + kind)
    return fd


_POOL = descriptor_pool.DescriptorPool()
_POOL.Add(_build())


def _cls(name: str):
    return message_factory.GetMessageClass(_POOL.FindMessageTypeByName("caffe." + name))


NetParameter = _cls("NetParameter")
LayerParameter = _cls("LayerParameter")
V1LayerParameter = _cls("V1LayerParameter")
BlobProto = _cls("BlobProto")
BlobShape = _cls("BlobShape")
