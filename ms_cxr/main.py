r"""Command-line entry point.

  python -m ms_cxr.main --config=configs/FILE.py[:ARGS] --workdir=DIR \
    [--config.SECTION.FIELD=VALUE ...] --mode=train|evaluate|train_and_evaluate|summary

Problems a user can fix (bad config, missing checkpoint, unreadable input) end with one line on stderr and exit
status 2; a non-finite loss exits with status 3 after keeping the last good checkpoint; SIGTERM (preemption) stops
training after the current step, saves a checkpoint and exits with status 4 (running the same command resumes).
With `MS_CXR_PREEMPTED_MARKER=FILE` in the environment, process 0 also writes FILE once the checkpoint is saved:
a launcher whose scheduler reports a task's status poorly (srun reports the highest status of all tasks, or a
signal when it killed one) can still tell a preemption (launch/slurm.sbatch).

Multi-process runs (SLURM, Cloud TPU pods, Kubernetes, `launch/local.sh --num_processes=N`) start
`jax.distributed` here, before anything touches a device; see ms_cxr/distributed.py and launch/.
"""

# ruff: noqa: E402  (the imports after the re-execution below)
import sys

if __name__ == '__main__':
  # First, before the imports below: the re-executed process would repeat them (2-3 s of every launch).
  from ms_cxr import hugepages

  hugepages.reexec_with_huge_pages()

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from ms_cxr import cli, distributed, evaluate, flops, models, train
from ms_cxr.errors import UserError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  'config', None, 'Config file, e.g. configs/densenet.py:dataset=nih.'
)
flags.DEFINE_string(
  'workdir', None, 'Directory for config.json, checkpoints, TensorBoard files, reports.'
)
flags.DEFINE_enum(
  'mode',
  'train_and_evaluate',
  ['train', 'evaluate', 'train_and_evaluate', 'summary'],
  'What to run.',
)
flags.DEFINE_bool(
  'memory',
  False,
  'With --mode=summary: also compile the train step at each size (batch train.global_batch_size on one '
  "device) and print XLA's peak memory estimate.",
)
flags.mark_flags_as_required(['config'])

EXIT_USER_ERROR = cli.EXIT_USER_ERROR
EXIT_NON_FINITE = 3
# Stopped by SIGTERM after saving a checkpoint: a scheduler can requeue the same command, which resumes.
EXIT_PREEMPTED = 4
PREEMPTED_MARKER_ENV = train.PREEMPTED_MARKER_ENV


def summary(config) -> None:
  """Prints the parameter count (`params: N`), each variable collection's size and the model FLOPs of one
  image's forward pass at each size (ms_cxr/flops.py), without training.

  With `--config.eval.ensemble_workdirs`, counts every member (from its config.json) and prints the total.
  """
  members = evaluate.ensemble_members(config)
  configs = [evaluate.load_workdir_config(m) for m in members] or [config]
  totals: dict[str, int] = {}
  for member in configs:
    model = models.create_model(member.model, len(member.data.labels), member.data.sizes)
    size = member.data.sizes[0]
    variables = jax.eval_shape(
      lambda model=model, size=size: model.init(
        jax.random.key(0), jax.numpy.zeros((1, size, size, 1), jax.numpy.uint8), train=False
      )
    )
    counts = {name: train.count_params(tree) for name, tree in variables.items()}
    sizes = ','.join(str(s) for s in member.data.sizes)
    print(
      f'model: {member.model.name} ({member.model.norm}), {len(member.data.labels)} labels, '
      f'sizes {sizes} px: {counts["params"]:,} params'
    )
    for size in member.data.sizes:
      gflop = flops.forward_flops(model, variables, size) / 1e9
      print(f'forward at {size} px: {gflop:.2f} GFLOP per image (a train step: 3x)')
    for name, count in counts.items():
      totals[name] = totals.get(name, 0) + count
  if len(configs) > 1:
    print(f'ensemble of {len(configs)} models')
  print(f'params: {totals.pop("params")}')
  for name in sorted(totals):
    print(f'{name}: {totals[name]}')
  if FLAGS.memory:
    for size in config.data.sizes:
      figures = train.train_step_memory(config, size)
      print(
        f'train step at {size} px, batch {config.train.global_batch_size}, remat={config.model.remat}: '
        f'peak {figures["peak_bytes"] / 2**20:,.0f} MiB (temporaries {figures["temp_bytes"] / 2**20:,.0f} MiB)'
      )


class _QuietLibraries(logging.logging.Filter):
  """Drops INFO chatter of checkpointing and input libraries; their warnings and errors still
  show."""

  NOISY = ('/orbax/', '/grain/', '/etils/', '/jax/_src/')

  def filter(self, record) -> bool:
    return record.levelno >= logging.logging.WARNING or not any(
      part in record.pathname for part in self.NOISY
    )


def run(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_QuietLibraries())
  try:
    config = FLAGS.config
    config.data  # noqa: B018 -- a config file that failed to load raises here, not at parse time
  except OSError as e:
    raise UserError(' '.join(str(e).split())) from None
  distributed.configure_compilation_cache(config.parallel.compilation_cache_dir)
  if FLAGS.mode == 'summary':
    summary(config)
    return
  if not FLAGS.workdir:
    raise UserError('--workdir is required for --mode=' + FLAGS.mode)
  # Before the first device query below: jax.distributed must start before the backends do.
  distributed.initialize(config.parallel)
  logging.info(
    'JAX %s on %d %s device(s), process %d of %d',
    jax.__version__,
    jax.device_count(),
    jax.default_backend(),
    jax.process_index(),
    jax.process_count(),
  )
  # Both modes build a device mesh from these: a bad value is a one-line error rather than a traceback.
  train.validate_parallel(config)
  if FLAGS.mode in ('train', 'train_and_evaluate'):
    train.train_and_evaluate(config, FLAGS.workdir)
  if FLAGS.mode in ('evaluate', 'train_and_evaluate'):
    if FLAGS.mode == 'evaluate':
      evaluate.check_trained_config(config, FLAGS.workdir)
    result = evaluate.evaluate(config, FLAGS.workdir)
    if jax.process_index() == 0:
      print(evaluate.format_table(result))


def main(argv) -> None:
  try:
    run(argv)
  except train.NonFiniteLossError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(EXIT_NON_FINITE)
  except train.Preempted as e:
    print(f'preempted: {e}', file=sys.stderr)
    sys.exit(EXIT_PREEMPTED)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
