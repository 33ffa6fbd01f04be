"""Defaults for every field; experiment configs start here and override a few.

Sections: data, model, optim, train, eval, ckpt, parallel. Any field can be overridden on the
command line with
`--config.SECTION.FIELD=VALUE`; an unknown field is an error.
"""

import ml_collections

from ms_cxr.data import datasets

# The embedded synthetic set's default sizes: large enough that a CPU run shows real learning.
SYNTHETIC_SPLITS = {'train': 6000, 'val': 600, 'test': 1200}


def get_config() -> ml_collections.ConfigDict:
  """Returns the default config (DenseNet-121, synthetic data, 224 px)."""
  config = ml_collections.ConfigDict()

  # --- data ---------------------------------------------------------------------------------------
  config.data = data = ml_collections.ConfigDict()
  data.dataset = 'synthetic'  # synthetic | nih | chexpert | vindr (see ms_cxr.data.datasets)
  data.root = ''  # dataset root as downloaded; unused for synthetic
  # Output of `python -m ms_cxr.data.prepare` (ArrayRecord shards, pre-resized): read instead of the native files.
  data.prepared_dir = ''
  data.labels = datasets.default_labels('synthetic')  # label names, in model-output order
  data.sizes = (224,)  # square input sides (px); several = multi-scale (see train.multiscale)
  # The dataset's split: the patient-wise validation carve of the real datasets and the synthetic set's contents.
  data.split_seed = 0
  # The data order: shuffle, augmentation, multi-scale size draws (replicates of a run vary this and train.seed).
  data.seed = 0
  data.val_fraction = 0.1  # real datasets: share of training patients held out for validation
  data.num_workers = 0  # Grain worker processes (0 = decode in the main process)
  data.prefetch_batches = 2  # batches prepared ahead of the step
  # Reader threads per process (per worker process with num_workers > 0). A training element is a whole batch,
  # decoded by one thread, so this many batches are decoded side by side and at most prefetch_batches more are
  # held ahead of them (Grain's own default, 16 threads and 500 elements, could hold hundreds of 896-px batches).
  data.read_threads = 4
  # Bad input (an unparseable label row, an unknown label name, a missing, truncated or corrupt image) stops the run
  # with an error naming the file and row. True: skip and count instead -- bad rows are dropped when the split is
  # read; a training image that fails to decode is replaced by the next readable one of the split, an evaluation
  # image is left out of the scores. Counts are logged, written to TensorBoard (data/skipped_*) and metrics.json.
  data.skip_bad = False
  data.synthetic = ml_collections.ConfigDict(
    {f'num_{split}': n for split, n in SYNTHETIC_SPLITS.items()}
  )
  data.synthetic.images_per_patient = 3
  data.nih = ml_collections.ConfigDict()
  data.nih.views = ('PA', 'AP')  # View Position values kept
  data.chexpert = ml_collections.ConfigDict()
  data.chexpert.views = ('frontal',)  # frontal | lateral
  # Uncertain (-1) labels: ignore (NaN, masked) | zeros | ones | mixed (ones for Atelectasis and Edema) | smooth.
  data.chexpert.uncertainty = 'ones'
  data.chexpert.blank = 0.0  # value of a blank (not mentioned) label; NaN masks it instead
  data.chexpert.smoothing_range = (0.55, 0.85)  # smooth: uncertain labels drawn in this range
  data.vindr = ml_collections.ConfigDict()
  # Label names: vindr (its own findings) | chexpert | nih (mapped for external validation; unmapped = NaN).
  data.vindr.label_space = 'vindr'
  data.vindr.aggregate = 'majority'  # across the 3 radiologists: any | majority
  data.augment = ml_collections.ConfigDict()
  data.augment.enabled = True
  data.augment.max_rotate_deg = 5.0
  data.augment.max_translate = 0.04  # fraction of the side
  data.augment.scale_range = (0.95, 1.05)
  data.augment.max_contrast = 0.1  # +- relative change of contrast and brightness
  # Off by default: laterality matters in chest X-rays (dextrocardia, side of a finding).
  data.augment.hflip = False

  # --- model --------------------------------------------------------------------------------------
  config.model = model = ml_collections.ConfigDict()
  model.name = 'densenet121'  # see ms_cxr.models.PRESETS
  model.dtype = 'float32'  # compute dtype: float32 | bfloat16 (params stay float32)
  model.bn_momentum = 0.9  # Flax convention: running = momentum * running + (1 - momentum) * batch
  model.bn_epsilon = 1e-5
  model.norm = (
    'batchnorm'  # batchnorm (shared by all sizes) | ssbn (a scale/shift and statistics per size)
  )
  # Start from other weights: a training workdir (its latest checkpoint; SSBN branches missing there start from the
  # nearest size, or from the plain BatchNorm of a single-scale model) or a torchvision DenseNet state dict file
  # (.pth / .safetensors / .npz). Ignored when the workdir already has a checkpoint (resume wins).
  # MS-ANet (model.name msanet_*): block outputs used as scales, how their CAMs are fused and pooled. These are
  # reconstructions (only the paper's abstract is public); see ms_cxr/models/msanet.py.
  model.msanet = ml_collections.ConfigDict()
  model.msanet.scales = (2, 3, 4)
  model.msanet.fusion = 'learned'  # learned | mean
  model.msanet.attention_pooling = 'reweight'  # reweight | none
  model.msanet.attention_gate = 'sigmoid'  # sigmoid | softmax
  model.init_from = ''
  model.remat = False  # rematerialise dense layers: less activation memory, ~30% more compute
  # 1x1 convolutions as matrix products (same parameters and function; faster on XLA:CPU, see PointwiseConv).
  model.pointwise_matmul = True
  # 3x3 convolutions' kernel gradients as one matrix product (same parameters and function; see SameConv).
  model.kernel_grad_matmul = True

  # --- optimizer ----------------------------------------------------------------------------------
  config.optim = optim = ml_collections.ConfigDict()
  optim.name = 'adam'  # adam | adamw | sgd (with momentum)
  optim.learning_rate = 1e-4
  optim.b1 = 0.9
  optim.b2 = 0.999
  optim.momentum = 0.9  # sgd only
  optim.nesterov = False  # sgd only
  optim.weight_decay = 0.0  # adamw: decoupled; adam/sgd: L2 added to the gradient
  optim.schedule = 'constant'  # constant | step | cosine
  optim.warmup_steps = 0  # linear warm-up from 0, before any schedule
  optim.step_boundaries = ()  # step: steps at which the rate is multiplied by step_factor
  optim.step_factor = 0.1
  optim.cosine_final_fraction = 0.0  # cosine: final rate as a fraction of the peak
  optim.grad_clip_norm = 0.0  # 0 = no clipping

  # --- training -----------------------------------------------------------------------------------
  config.train = train = ml_collections.ConfigDict()
  train.seed = 0  # parameter init and per-step keys
  train.global_batch_size = 32  # across all devices and hosts
  train.num_steps = 10_000
  train.log_every_steps = 50
  train.eval_every_steps = 1000  # validation AUROC for the best checkpoint; 0 = never
  train.loss = 'bce'  # bce | weighted_bce (w_pos = exp(1 - p_k), w_neg = exp(p_k)) | focal
  train.focal_gamma = 2.0
  train.label_weights = ()  # optional per-label loss weights for bce, one per label (empty = all 1)
  # Attention models (MS-ANet): loss on each scale's logits, and attention consistency under a transform.
  train.scale_loss_weight = 0.0
  train.consistency_weight = 0.0
  train.consistency_transform = 'rescale'  # rescale | translate | rotate | hflip
  # Multi-scale training, when data.sizes has several sizes:
  #   round_robin: one size per step, cycling; random: one size per step drawn with size_probs;
  #   all: every size of the same images in one step, losses combined by multiscale_loss (mean | sum).
  train.multiscale = 'round_robin'
  train.size_probs = ()  # random: one probability per size (empty = uniform)
  train.multiscale_loss = 'mean'
  # Gradient accumulation per size (one entry per size, empty = 1): a size's global batch is processed in this
  # many sequential micro-batches, so large sizes fit in memory while the global batch stays fixed.
  train.accum_steps = ()
  # Train only these sizes' SSBN scale/shift, everything else frozen (e.g. to add a size to a trained model).
  train.trainable_sizes = ()

  # --- evaluation ---------------------------------------------------------------------------------
  config.eval = ev = ml_collections.ConfigDict()
  ev.split = 'test'  # split predicted by --mode=evaluate
  # Report folder under <workdir>/eval/; '' = the split name (+ _best or _step<N> for those checkpoints).
  ev.name = ''
  ev.checkpoint = 'latest'  # latest | best
  ev.step = -1  # a specific checkpoint step; -1 = use eval.checkpoint
  ev.val_split = 'val'  # split scored during training to keep the best checkpoint
  ev.batch_size = 64  # global
  # Multi-scale models: how per-size predictions are fused -- mean_prob | mean_logit | max | best_on_val (per
  # label, the size with the best validation AUROC). Each size alone is reported too.
  ev.fusion = 'mean_prob'
  # Test-time augmentation: logits averaged over the image and these views (hflip | zoom | shift, see
  # ms_cxr.train.tta_view); () = none. Used by --mode=evaluate, not by validation during training.
  ev.tta = ()
  ev.ensemble_workdirs = ''  # comma-separated workdirs: evaluate the mean of their predictions
  ev.bootstrap_resamples = 1000  # 95% AUROC intervals by resampling patients; 0 = none
  ev.bootstrap_seed = 0
  ev.max_images = 0  # 0 = the whole split (a positive number evaluates a prefix, for quick checks)
  # Also predict the validation split, fix each label's Youden threshold there and report sensitivity/specificity
  # at it on the evaluated split (operating_points_val_threshold).
  ev.val_thresholds = True
  ev.plots = True  # roc.png, pr.png (a panel per label) and reliability.png
  # Attention maps (MS-ANet: fused multi-scale map; DenseNet: class activation map), at map_size (0 = the largest
  # configured size). Overlays: heatmaps/<id>__<label>.png for heatmap_ids (comma-separated ids as in
  # predictions.csv) or else the first heatmap_images images, boxed ones first. All maps computed go to
  # attention_maps.npz.
  ev.map_size = 0
  ev.heatmap_images = 4
  ev.heatmap_ids = ''
  # Pointing game and IoU of the maps against the split's boxes (ChestX-ray14 BBox_List, VinDr, synthetic), per
  # label, in metrics.json `localization` and localization.md; at most localization_max_images boxed images (0 =
  # all), maps upsampled to localization_grid px and thresholded at iou_threshold of their range for IoU.
  ev.localization = True
  ev.localization_max_images = 0
  ev.localization_grid = 224
  ev.iou_threshold = 0.5
  # Pointing game: a hit within this margin around a box, a fraction of the image side (0 = inside the box;
  # Zhang et al.'s 15 px at 224 px is 0.067).
  ev.pointing_tolerance = 0.0

  # --- checkpoints --------------------------------------------------------------------------------
  config.ckpt = ckpt = ml_collections.ConfigDict()
  ckpt.every_steps = 500
  ckpt.max_to_keep = 3
  ckpt.async_save = True

  # --- parallelism --------------------------------------------------------------------------------
  config.parallel = par = ml_collections.ConfigDict()
  par.api = 'shard_map'  # shard_map (jit over a 1-D mesh) | pmap; both run the same per-device step
  par.num_devices = 0  # 0 = all local devices
  # Multi-process (multi-host) runs, started before anything touches a device (ms_cxr/distributed.py). SLURM srun
  # with several tasks, Cloud TPU pod env vars and Kubernetes Indexed Jobs are detected; multihost=True forces
  # jax.distributed.initialize() (JAX then auto-detects what is not set below, e.g. on Cloud TPU VMs).
  par.multihost = False
  par.coordinator_address = ''  # host:port of process 0 ('' = JAX_COORDINATOR_ADDRESS or auto)
  par.num_processes = -1  # -1 = JAX_NUM_PROCESSES or auto-detect
  par.process_id = -1  # -1 = JAX_PROCESS_ID (Kubernetes: JOB_COMPLETION_INDEX) or auto-detect
  # Multi-process runs stop on SIGTERM at a step all processes agree on, checked every this many steps (a tiny
  # all-gather; single-process runs check every step for free).
  par.preemption_check_every_steps = 1
  # Persistent compilation cache ('' = off). On a cluster point it at a shared filesystem (e.g.
  # <runs>/jax_cache): requeued jobs and sweep members with the same shapes then skip compilation.
  par.compilation_cache_dir = ''

  return config


def apply_cpu_experiment(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The README's CPU experiment: a small DenseNet, the same step and image budget for every row of the table."""
  config.model.name = 'densenet_small'
  config.train.global_batch_size = 16
  config.train.num_steps = 240
  config.train.log_every_steps = 40
  config.train.eval_every_steps = 0  # no model selection: every row is its final checkpoint
  config.ckpt.every_steps = 120
  config.optim.learning_rate = 2e-3
  config.optim.schedule = 'cosine'
  config.optim.warmup_steps = 30
  config.data.synthetic.num_val = 300
  config.data.synthetic.num_test = 900
  return config


def apply_smoke(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks any config to a run of at most ~2 minutes on a 2-core CPU (tests use this)."""
  config.model.name = 'msanet_tiny' if config.model.name.startswith('msanet') else 'densenet_tiny'
  # Small stand-ins keep the number of sizes (and so the multi-scale code paths) of the full config.
  config.data.sizes = (32, 48, 64)[: len(config.data.sizes)]
  config.data.synthetic.num_train = 256
  config.data.synthetic.num_val = 48
  config.data.synthetic.num_test = 60
  config.train.global_batch_size = 8
  config.train.num_steps = 12
  config.train.log_every_steps = 4
  config.train.eval_every_steps = 6
  config.optim.learning_rate = 1e-3
  config.eval.batch_size = 16
  config.eval.bootstrap_resamples = 200
  config.ckpt.every_steps = 6
  config.ckpt.max_to_keep = 2
  return config
