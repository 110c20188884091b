"""The benchmark matrix: batch-norm input shapes of real networks, not a hand list one can tune to.

    python benchmarks/matrix.py               # counts per family and the default sample
    python benchmarks/matrix.py --write       # regenerate benchmarks/matrix.json (about a minute)

Where the shapes come from (each case keeps its provenance: family -> ["model@resolution", ...]):

* torchvision classification models with batch norm (every builder matched by CLASSIFICATION below;
  `--write` refuses to write while some torchvision classification model with batch norm is matched
  by none), at their native resolution (the crop size of their ImageNet weights: 224, inception_v3
  299, efficientnet_b1..b7 240..600, efficientnet_v2 384/480) and at 160 (SMALL_RES);
* torchvision detection and segmentation models whose batch norm is real batch norm (DETECTION,
  SEGMENTATION; the others switch to FrozenBatchNorm2d, a fixed affine map, once a pretrained
  backbone is given, which is how they are trained);
* torchvision video models with BatchNorm3d (r3d_18, mc3_18, r2plus1d_18, s3d) at two clip sizes;
* BatchNorm1d of tabular (N, C) and sequence (N, C, L) models outside torchvision (TABULAR,
  SEQUENCE: the model and the paper setting each shape comes from);
* a seeded random sample of odd shapes (odd channel counts and planes).

Models are built and run on the "meta" device: shapes propagate, nothing is allocated or computed,
so the zoo costs Python time only (about a minute). Forward pre-hooks on every torch.nn batch-norm
module record the input shapes. Shapes are deduplicated over all families; every case has the
batch sizes BATCHES and at most MAX_NUMEL elements.

The generated list is committed (benchmarks/matrix.json) so a benchmark run does not depend on
model code; tests/test_benchmark_report.py checks that regeneration reproduces it.
"""
import argparse
import contextlib
import json
import math
import os
import random
import re
import sys
from collections import OrderedDict

HERE = os.path.dirname(os.path.abspath(__file__))
MATRIX_JSON = os.path.join(HERE, "matrix.json")

# Batch sizes of every model shape: 1 (inference and per-sample fine-tuning: per-call overhead
# dominates), 8 (a small per-device batch, detection and video training) and 32 (the usual
# per-device classification batch).
BATCHES = (1, 8, 32)

# The second resolution of classification models. 160 is the low-resolution phase of progressive
# resizing (FFCV's ResNet-50 recipes train at 160..192), and its planes (80x80, 40x40, 20x20,
# 10x10, 5x5) have other sizes and cache-line alignments than the native 224's (112x112 .. 7x7).
SMALL_RES = 160
# ... except where a model cannot train at 160: inception_v3's auxiliary head (which runs in
# training) pools its 17x17 maps to 5x5 for a 5x5 convolution, so inputs below 299 fail; it takes
# its weights' evaluation resize, 342, instead. torchvision's maxvit_t partitions every stage into
# 7x7 windows, so its inputs must be multiples of 224: it runs at 224 only.
SECOND_RES = {"inception_v3": 342, "maxvit_t": 224}

# At most 64 Mi elements per case (256 MiB in float32). A benchmark group holds the input and dy
# in its dtype plus, while timing, the output, dx, the floor's copy and what torch's, compiled
# torch's and bnext's autograd save: about ten tensors of the input's size, 2.5 GiB at the cap, and
# glibc keeps freed blocks (bench.py tune_malloc) on a 24 GiB machine. Beyond the cap a case adds
# no information (any input over 64 Mi elements is far beyond every cache, so its floor ratio is
# that of a capped one) but minutes of run time. Shapes over the cap are dropped, not scaled: the
# same layer is in the matrix at the smaller batch sizes; matrix.json counts the dropped ones.
MAX_NUMEL = 64 * 2**20

# Models run at batch EXTRACT_BATCH, in training mode (where inception's and googlenet's auxiliary
# heads run too) and every leading dimension is rescaled per batch size: batch 1 would make torch
# refuse training-mode BN on 1x1 maps (one value per channel), and the leading dimension of every
# BN input of these models is a multiple of the batch (detection heads: RoIs per image).
EXTRACT_BATCH = 2

# Size buckets of the sample's strata, by element count: < 64 Ki (under 256 KiB in float32, the
# floor targets exclude them), < 1 Mi, < 8 Mi (within or near the last-level cache), >= 8 Mi.
SIZE_BUCKETS = (64 * 2**10, 2**20, 8 * 2**20)

# Classification families: (family, regular expression on the torchvision builder name).
CLASSIFICATION = (
    ("resnet", r"resnet\d+"),
    ("resnext", r"resnext\w+"),
    ("wide_resnet", r"wide_resnet\w+"),
    ("mobilenet_v2", r"mobilenet_v2"),
    ("mobilenet_v3", r"mobilenet_v3_\w+"),
    ("efficientnet", r"efficientnet_\w+"),
    ("regnet", r"regnet_\w+"),
    ("densenet", r"densenet\d+"),
    ("inception_v3", r"inception_v3"),
    ("googlenet", r"googlenet"),
    ("shufflenet", r"shufflenet_v2_\w+"),
    ("mnasnet", r"mnasnet\w+"),
    # Not named in issue 23's list, but torchvision classification models with batch norm too.
    ("vgg_bn", r"vgg\d+_bn"),
    ("maxvit", r"maxvit_\w+"),
)

# Detection models with real batch norm, with their input sizes (H, W) after the model's own
# transform. fasterrcnn/maskrcnn/retinanet v1, fcos, keypointrcnn and fasterrcnn_mobilenet_v3 use
# FrozenBatchNorm2d as soon as a pretrained backbone is given (`norm_layer = FrozenBatchNorm2d if
# is_trained`), which is not batch norm; ssd300_vgg16's VGG has none. The R-CNN v2 builders use
# nn.BatchNorm2d in the backbone, FPN and heads regardless; retinanet v2 in the backbone only (its
# head has GroupNorm). R-CNN inputs: the builders' min_size 800 on a 4:3 COCO image, padded to a
# multiple of 32 (800x1088), and detectron2's smallest multi-scale training size, 640 (640x864).
# SSDlite resizes every image to 320x320.
RCNN_SIZES = ((800, 1088), (640, 864))
DETECTION = (
    ("ssdlite320_mobilenet_v3_large", ((320, 320),)),
    ("fasterrcnn_resnet50_fpn_v2", RCNN_SIZES),
    ("maskrcnn_resnet50_fpn_v2", RCNN_SIZES),
    ("retinanet_resnet50_fpn_v2", RCNN_SIZES),
)
# Training-time RoIs per image of the R-CNN heads: the box head sees box_batch_size_per_image=512
# sampled proposals, the mask head the positive ones, at most box_positive_fraction=0.25 of them.
BOX_ROIS, MASK_ROIS = 512, 128

# Segmentation models (all keep nn.BatchNorm2d with a pretrained backbone), with the auxiliary
# head their published weights were trained with, at 480 (the training crop of torchvision's
# segmentation recipe) and 520 (its evaluation resize).
SEGMENTATION = (
    ("deeplabv3_mobilenet_v3_large", {"aux_loss": True}),
    ("deeplabv3_resnet50", {"aux_loss": True}),
    ("deeplabv3_resnet101", {"aux_loss": True}),
    ("fcn_resnet50", {"aux_loss": True}),
    ("fcn_resnet101", {"aux_loss": True}),
    ("lraspp_mobilenet_v3_large", {}),
)
SEGMENTATION_RES = (480, 520)

# Video models: clips (T, H, W). r3d/mc3/r2plus1d were trained on 16-frame 112x112 clips
# (torchvision's video recipe, --clip-len 16), s3d on 64-frame 224x224 clips (its paper); the
# second clip halves the frames.
VIDEO = (
    ("r3d_18", ((16, 112, 112), (8, 112, 112))),
    ("mc3_18", ((16, 112, 112), (8, 112, 112))),
    ("r2plus1d_18", ((16, 112, 112), (8, 112, 112))),
    ("s3d", ((64, 224, 224), (32, 224, 224))),
)

# BatchNorm1d over (N, C): (source, channel counts, batch sizes). Batch 1 cannot train (one value
# per channel), and these models train on large batches of rows.
TABULAR = (
    ("simclr_projection_head",  # Chen et al. 2020: 2048-wide MLP with BN after each Linear
     (2048, 128), (256, 1024, 4096)),
    ("byol_projector",  # Grill et al. 2020: 4096-wide hidden layer with BN, output 256
     (4096,), (256, 1024, 4096)),
    ("simsiam_predictor",  # Chen & He 2021: 2048 -> 512 (BN) -> 2048
     (512,), (256, 512)),
    ("tabnet_forest_cover",  # Arik & Pfister 2019: feature BN over 54 inputs at batch 16384;
     (54,), (16384,)),
    ("tabnet_ghost_bn",  # ... ghost BN of the transformers on virtual batches of 128..512 rows,
     (16, 64, 128, 256), (128, 256, 512)),  # over 2*(n_d+n_a) channels (n_d = n_a in 8..64)
    ("tabular_resnet",  # Gorishniy et al. 2021 ("Revisiting deep learning models for tabular
     (192, 256, 512, 1024), (256, 512, 1024)),  # data"): BN1d in each block, d and 2d wide
    ("pointnet_head",  # Qi et al. 2017: classifier MLP 512 -> 256 with BN, batch 32
     (512, 256), (32,)),
)

# BatchNorm1d over (N, C, L): (source, channel counts, lengths L); batch sizes BATCHES.
SEQUENCE = (
    ("pointnet",  # Qi et al. 2017: shared per-point MLPs (Conv1d + BN) over 1024 or 2048 points
     (64, 128, 1024), (1024, 2048)),
    ("conformer_conv_module",  # Gulati et al. 2020: BN over (N, d, T), d = 144/256/512 (S/M/L),
     (144, 256, 512), (250, 400)),  # T: 10 s and 16 s utterances at 40 ms frames
    ("tacotron2_encoder",  # Shen et al. 2018: three 512-channel convs with BN over ~150 characters
     (512,), (150,)),
    ("tacotron2_postnet",  # five convs with BN over ~800 mel frames (10 s at 12.5 ms); the last 80
     (512, 80), (800,)),
    ("quartznet",  # Kriman et al. 2020: separable conv blocks with BN, 256..1024 channels over
     (256, 512, 1024), (800,)),  # 16 s of 10 ms features after the stride-2 first conv
    ("ecapa_tdnn",  # Desplanques et al. 2020: 512/1024-channel TDNN blocks and the 1536-channel
     (512, 1024, 1536), (200,)),  # aggregation, BN over 2 s crops (200 frames)
)

# The seeded random sample of odd shapes: counts and sizes that real networks rarely use, so no
# kernel can be tuned to round numbers only.
RANDOM_SEED = 23
RANDOM_CASES = 48
ODD_C = (1, 3, 17, 37, 100, 257, 1000, 1023)
ODD_N = (1, 2, 3, 5, 8, 13, 32)
ODD_HW = (1, 3, 9, 17, 35, 73, 149)
ODD_L = (1, 7, 33, 127, 1001)
ODD_T = (1, 3, 5)

# Family order: primary family of a shared shape, report order and the sample's round robin.
FAMILIES = ([f for f, _ in CLASSIFICATION] + ["detection", "segmentation", "video", "tabular", "sequence", "random"])


def _bn_types():
    import torch

    # torch.nn's batch norm classes (BatchNorm1d/2d/3d, SyncBatchNorm, the lazy ones); not
    # torchvision.ops.FrozenBatchNorm2d, which is a fixed affine map.
    return (torch.nn.modules.batchnorm._BatchNorm,)


def has_batch_norm(model):
    return any(isinstance(m, _bn_types()) for m in model.modules())


@contextlib.contextmanager
def _record(model):
    """Collects the input shape of every batch-norm call of `model` into the yielded set."""
    shapes = set()
    handles = [m.register_forward_pre_hook(lambda _m, args: shapes.add(tuple(args[0].shape)))
               for m in model.modules() if isinstance(m, _bn_types())]
    try:
        yield shapes
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _meta_build(name):
    """Builds on the meta device. RegNet's builder derives its stage widths from a few dozen torch
    values and reads them back (.tolist()), which meta tensors cannot do: that one computation runs
    on the CPU, the model itself on meta."""
    import warnings

    with warnings.catch_warnings():
        # inception_v3 and googlenet warn that their default initialization will change: the
        # values of meta parameters do not exist, only their shapes matter here.
        warnings.simplefilter("ignore", FutureWarning)
        with _meta_context(name):
            yield


@contextlib.contextmanager
def _meta_context(name):
    import torch

    if not name.startswith("regnet_"):
        with torch.device("meta"):
            yield
        return
    from torchvision.models import regnet

    original = regnet.BlockParams.__dict__["from_init_params"].__func__

    def on_cpu(cls, *args, **kwargs):
        with torch.device("cpu"):
            return original(cls, *args, **kwargs)

    regnet.BlockParams.from_init_params = classmethod(on_cpu)
    try:
        with torch.device("meta"):
            yield
    finally:
        regnet.BlockParams.from_init_params = classmethod(original)


def _native_res(name):
    """Crop size of the model's ImageNet-1k weights (the first ones torchvision ships)."""
    from torchvision import models

    weights = models.get_model_weights(name)
    w = getattr(weights, "IMAGENET1K_V1", None) or weights.DEFAULT
    return int(w.transforms().crop_size[0])


def _family_of(name):
    for family, pattern in CLASSIFICATION:
        if re.fullmatch(pattern, name):
            return family
    return None


def classification_models():
    from torchvision import models

    return [n for n in models.list_models(module=models) if _family_of(n) is not None]


def unlisted_models_with_batch_norm():
    """torchvision classification models with batch norm that CLASSIFICATION misses (builds all of
    them on meta: seconds)."""
    from torchvision import models

    missing = []
    for name in models.list_models(module=models):
        if _family_of(name) is None:
            with _meta_build(name):
                model = models.get_model(name, weights=None)
            if has_batch_norm(model):
                missing.append(name)
            del model
    return missing


def _run(model, *inputs, call=None):
    """Training-mode meta run of `model` (or of `call(model)`); returns the BN input shapes."""
    import torch

    model.train()
    with _record(model) as shapes, torch.device("meta"):
        if call is None:
            model(*inputs)
        else:
            call(model)
    return shapes


def classification_shapes(name, resolutions):
    """{resolution: BN input shapes}; the model is built once (building dominates the cost)."""
    import torch
    from torchvision import models

    with _meta_build(name):
        model = models.get_model(name, weights=None)
    return {res: _run(model, torch.empty(EXTRACT_BATCH, 3, res, res, device="meta")) for res in resolutions}


def detection_shapes(name, sizes):
    """{(H, W): BN input shapes}: backbone (and FPN) on the transformed image batch, then the heads
    on their training-time inputs; the models' full forward needs targets, and its box decoding is
    data dependent, which meta tensors cannot run."""
    import torch
    from torchvision import models

    with _meta_build(name):
        model = models.get_model(name, weights=None, weights_backbone=None)

    def call_at(size):
        def call(m):
            features = m.backbone(torch.empty(EXTRACT_BATCH, 3, *size))
            if name.startswith("ssdlite"):
                m.head(list(features.values()))
            if hasattr(m, "roi_heads"):
                m.roi_heads.box_head(torch.empty(EXTRACT_BATCH * BOX_ROIS, m.backbone.out_channels, 7, 7))
                if m.roi_heads.mask_head is not None:
                    m.roi_heads.mask_head(torch.empty(EXTRACT_BATCH * MASK_ROIS, m.backbone.out_channels, 14, 14))
        return call

    return {size: _run(model, call=call_at(size)) for size in sizes}


def segmentation_shapes(name, kwargs, resolutions):
    import torch
    from torchvision import models

    with _meta_build(name):
        model = models.get_model(name, weights=None, weights_backbone=None, **kwargs)
    return {res: _run(model, torch.empty(EXTRACT_BATCH, 3, res, res, device="meta")) for res in resolutions}


def video_shapes(name, clips):
    import torch
    from torchvision import models

    with _meta_build(name):
        model = models.get_model(name, weights=None)
    return {clip: _run(model, torch.empty(EXTRACT_BATCH, 3, *clip, device="meta")) for clip in clips}


def _per_batch(shapes):
    """Model shapes at EXTRACT_BATCH -> the same layers at every batch size of BATCHES."""
    for s in sorted(shapes):
        if s[0] % EXTRACT_BATCH:
            raise RuntimeError(f"batch-norm input {s}: leading dimension is not a multiple of the extraction "
                               f"batch {EXTRACT_BATCH}, so it cannot be rescaled to other batch sizes")
        per_sample = s[0] // EXTRACT_BATCH
        for b in BATCHES:
            yield (per_sample * b,) + tuple(s[1:])


def model_sources(models_filter=None):
    """(family, source label, shapes at every batch size) of every torchvision model, in FAMILIES
    order; `models_filter(name)` keeps a subset (the regeneration test uses it)."""
    keep = models_filter or (lambda _name: True)
    for family, _ in CLASSIFICATION:
        for name in classification_models():
            if _family_of(name) == family and keep(name):
                res = sorted({_native_res(name), SECOND_RES.get(name, SMALL_RES)})
                for r, shapes in classification_shapes(name, res).items():
                    yield family, f"{name}@{r}", list(_per_batch(shapes))
    for name, sizes in DETECTION:
        if keep(name):
            for (h, w), shapes in detection_shapes(name, sizes).items():
                yield "detection", f"{name}@{h}x{w}", list(_per_batch(shapes))
    for name, kwargs in SEGMENTATION:
        if keep(name):
            for r, shapes in segmentation_shapes(name, kwargs, SEGMENTATION_RES).items():
                yield "segmentation", f"{name}@{r}", list(_per_batch(shapes))
    for name, clips in VIDEO:
        if keep(name):
            for clip, shapes in video_shapes(name, clips).items():
                yield "video", f"{name}@{'x'.join(map(str, clip))}", list(_per_batch(shapes))


def table_sources():
    """BatchNorm1d shapes of the TABULAR and SEQUENCE tables."""
    for name, channels, batches in TABULAR:
        yield "tabular", name, [(n, c) for c in channels for n in batches]
    for name, channels, lengths in SEQUENCE:
        yield "sequence", name, [(n, c, l) for c in channels for l in lengths for n in BATCHES]


def random_sources():
    """RANDOM_CASES odd shapes from a generator seeded with RANDOM_SEED (stable across runs and
    Python versions: random.Random with an int seed and choice() only)."""
    rng = random.Random(RANDOM_SEED)
    shapes = []
    while len(shapes) < RANDOM_CASES:
        rank = rng.choice((2, 3, 4, 4, 4, 5))  # 4-D (BatchNorm2d) weighted as in real networks
        n, c = rng.choice(ODD_N), rng.choice(ODD_C)
        if rank == 2:
            shape = (n, c)
        elif rank == 3:
            shape = (n, c, rng.choice(ODD_L))
        elif rank == 4:
            shape = (n, c, rng.choice(ODD_HW), rng.choice(ODD_HW))
        else:
            shape = (n, c, rng.choice(ODD_T), rng.choice(ODD_HW), rng.choice(ODD_HW))
        if trainable(shape) and math.prod(shape) <= MAX_NUMEL and shape not in shapes:
            shapes.append(shape)
    yield "random", f"seed{RANDOM_SEED}", shapes


def trainable(shape):
    # Training-mode batch norm needs more than one value per channel (torch raises otherwise).
    return math.prod(shape) // shape[1] > 1


def build(sources):
    """Deduplicated case records from (family, source, shapes) triples: one record per distinct
    shape, with every family and source it came from; returns (cases, {family: number of distinct
    shapes over MAX_NUMEL})."""
    by_shape = {}
    dropped = {}
    for family, source, shapes in sources:
        for shape in shapes:
            shape = tuple(int(v) for v in shape)
            if not trainable(shape):
                continue  # eval-only layers (1x1 maps at batch 1): see trainable()
            if math.prod(shape) > MAX_NUMEL:
                dropped.setdefault(family, set()).add(shape)
                continue
            srcs = by_shape.setdefault(shape, {})
            names = srcs.setdefault(family, [])
            if source not in names:
                names.append(source)
    cases = []
    for shape, srcs in by_shape.items():
        fams = sorted(srcs, key=FAMILIES.index)
        cases.append({"shape": list(shape), "family": fams[0],
                      "sources": OrderedDict((f, sorted(srcs[f])) for f in fams)})
    cases.sort(key=case_order)
    return cases, {f: len(dropped[f]) for f in FAMILIES if f in dropped}


def case_order(case):
    return (FAMILIES.index(case["family"]), len(case["shape"]), math.prod(case["shape"]), case["shape"])


def generate(models_filter=None):
    """The matrix as matrix.json holds it (without the version stamp)."""
    sources = list(model_sources(models_filter))
    if models_filter is None:
        sources += list(table_sources()) + list(random_sources())
    cases, dropped = build(sources)
    return {"settings": settings(), "dropped_over_max_numel": dropped, "cases": cases}


def settings():
    return {"batches": list(BATCHES), "small_res": SMALL_RES, "second_res": SECOND_RES, "max_numel": MAX_NUMEL,
            "random_seed": RANDOM_SEED, "random_cases": RANDOM_CASES}


def dumps(matrix):
    """matrix.json text: one case a line, so a regenerated file diffs line by line."""
    head = {k: v for k, v in matrix.items() if k != "cases"}
    text = json.dumps(head, indent=1)[:-2] + ',\n "cases": [\n'
    text += ",\n".join("  " + json.dumps(c, separators=(",", ": ")) for c in matrix["cases"])
    return text + "\n ]\n}\n"


def load(path=MATRIX_JSON):
    if not os.path.exists(path):
        raise FileNotFoundError(f"benchmark matrix {path} does not exist: run `python benchmarks/matrix.py --write`")
    with open(path) as f:
        return json.load(f)


def full_matrix(path=MATRIX_JSON):
    """Every case of the committed matrix: [{"shape", "family", "sources"}], in FAMILIES order."""
    return load(path)["cases"]


def rank_kind(shape):
    return {2: "bn1d (N,C)", 3: "bn1d (N,C,L)", 4: "bn2d", 5: "bn3d"}[len(shape)]


def size_bucket(shape):
    numel = math.prod(shape)
    return sum(numel >= b for b in SIZE_BUCKETS)


def sample_matrix(n, cases=None, seed=RANDOM_SEED):
    """A deterministic, stratified sample of n cases (of `cases`, default the full matrix).

    Strata: per family, (rank, size bucket). Families take turns (FAMILIES order), one case a turn,
    so every family is in any sample of at least as many cases as there are families; a family's
    k-th pick comes from its strata in rotation, starting at an offset of the family's position so
    the first picks of different families cover different sizes. Within a stratum cases are in a
    seeded random order, the family's own shapes before those it shares with an earlier family. A
    shape shared by several families (a case lists every family it came from) counts for the
    family that picks it first.
    """
    cases = full_matrix() if cases is None else cases
    if n >= len(cases):
        return sorted(cases, key=case_order)
    families = [f for f in FAMILIES if any(f in c["sources"] for c in cases)]
    strata = {}
    for f in families:
        groups = {}
        for c in cases:
            if f in c["sources"]:
                groups.setdefault((len(c["shape"]), size_bucket(c["shape"])), []).append(c)
        ordered = []
        for key in sorted(groups):
            # The family's own shapes (primary family f) first, then the ones it shares with an
            # earlier family: a family's picks show what it adds to the matrix.
            rng = random.Random(f"{seed}/{f}/{key}")
            own = sorted((c for c in groups[key] if c["family"] == f), key=lambda c: c["shape"])
            shared = sorted((c for c in groups[key] if c["family"] != f), key=lambda c: c["shape"])
            rng.shuffle(own)
            rng.shuffle(shared)
            ordered.append(own + shared)
        strata[f] = ordered
    picked, seen = [], set()
    turn = 0
    while len(picked) < n:
        progressed = False
        for i, f in enumerate(families):
            if len(picked) == n:
                break
            groups = strata[f]
            for k in range(len(groups)):
                group = groups[(i + turn + k) % len(groups)]
                while group and tuple(group[0]["shape"]) in seen:
                    group.pop(0)
                if group:
                    case = group.pop(0)
                    seen.add(tuple(case["shape"]))
                    picked.append(case)
                    progressed = True
                    break
        if not progressed:
            break
        turn += 1
    return sorted(picked, key=case_order)


# --quick: one case per rank (two of BatchNorm2d) of at most QUICK_MAX_NUMEL elements, so a smoke
# run passes every code path (both BatchNorm1d forms, 2-D, 3-D) in well under a minute.
QUICK_MAX_NUMEL = 2**20
QUICK_PER_RANK = ((2, 1), (3, 1), (4, 2), (5, 1))


def quick_matrix(cases=None):
    cases = full_matrix() if cases is None else cases
    small = [c for c in cases if math.prod(c["shape"]) <= QUICK_MAX_NUMEL]
    picked = []
    for rank, k in QUICK_PER_RANK:
        picked += sample_matrix(k, [c for c in small if len(c["shape"]) == rank])
    return sorted(picked, key=case_order)


def case_label(case):
    """Short provenance: the first source and how many more."""
    srcs = [s for names in case["sources"].values() for s in names]
    more = f" +{len(srcs) - 1}" if len(srcs) > 1 else ""
    return f"{case['family']}:{srcs[0]}{more}"


def counts(cases):
    """Cases per primary family and rank kind."""
    out = OrderedDict()
    for c in cases:
        fam = out.setdefault(c["family"], OrderedDict())
        k = rank_kind(c["shape"])
        fam[k] = fam.get(k, 0) + 1
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--write", action="store_true", help=f"regenerate {os.path.relpath(MATRIX_JSON)}")
    p.add_argument("--sample", type=int, default=None, help="print the sample of this many cases")
    args = p.parse_args(argv)
    if args.write:
        missing = unlisted_models_with_batch_norm()
        if missing:
            sys.exit(f"torchvision classification models with batch norm that matrix.CLASSIFICATION does not "
                     f"match: {', '.join(missing)}; add them to a family")
        import torch
        import torchvision

        matrix = generate()
        matrix = {"generated_with": {"torch": torch.__version__, "torchvision": torchvision.__version__}, **matrix}
        with open(MATRIX_JSON, "w") as f:
            f.write(dumps(matrix))
        print(f"wrote {MATRIX_JSON}: {len(matrix['cases'])} cases")
    cases = full_matrix()
    for fam, per_kind in counts(cases).items():
        print(f"{fam:<14} {sum(per_kind.values()):5d}  " + "  ".join(f"{k} {v}" for k, v in per_kind.items()))
    print(f"total {len(cases)} cases (shapes; each runs in 1 or 2 layouts x 2 dtypes x 3 phases)")
    if args.sample:
        for c in sample_matrix(args.sample, cases):
            print(f"{str(tuple(c['shape'])):<28} {case_label(c)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
