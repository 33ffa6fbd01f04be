r"""Expands a hyperparameter sweep into one job per combination of overrides, printed or submitted.

  python launch/sweep.py --launcher=slurm --base='--config=configs/ssbn.py:dataset=nih' \
    --sweep='optim.learning_rate=1e-4,3e-4' --sweep='train.seed=0,1' --workdir_root=runs/sweep [--submit]

prints four `sbatch ... launch/slurm.sbatch --config=... --workdir=runs/sweep/learning_rate=1e-4_seed=0
--config.optim.learning_rate=1e-4 --config.train.seed=0` commands (the cartesian product of the --sweep lists,
first --sweep outermost). Nothing runs without --submit, which runs the commands one after another (local jobs
train in turn; slurm, tpu_pod and k8s jobs are submitted).

--sweep is `SECTION.FIELD=V1,V2,...`; commas inside parentheses or brackets stay in the value
(`data.sizes=(224,),(224,448)`). Workdirs are named from the overrides, `field=value` joined by `_` (the full
`section.field` when two fields share a name), under --workdir_root. Launchers:

  local    launch/local.sh [LAUNCHER_ARGS --] ARGS        (e.g. --launcher_args='--num_processes=2')
  slurm    sbatch --job-name=NAME [LAUNCHER_ARGS] launch/slurm.sbatch ARGS
  tpu_pod  launch/tpu_pod.sh LAUNCHER_ARGS -- ARGS       (--launcher_args='--name=POD --zone=ZONE')
  k8s      kubectl apply -f MANIFEST_DIR/JOB.yaml         (launch/k8s_job.yaml renamed per job, args replaced;
           written even without --submit, for inspection, on this machine: --manifest_dir, default
           ./k8s_manifests; WORKDIR_ROOT is the path inside the pods, e.g. /runs/sweep)

where ARGS = BASE --workdir=WORKDIR_ROOT/NAME --config.SECTION.FIELD=VALUE ... Workdir paths are used as given:
on a cluster, give a --workdir_root every host mounts.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence

LAUNCH_DIR = os.path.dirname(os.path.abspath(__file__))
LAUNCHERS = ('local', 'slurm', 'tpu_pod', 'k8s')
DEFAULT_MANIFEST_DIR = 'k8s_manifests'


def split_values(text: str) -> list[str]:
  """`'1e-4,3e-4'` -> ['1e-4', '3e-4']; commas nested in (), [] or {} do not split."""
  values, depth, current = [], 0, ''
  for char in text:
    if char in '([{':
      depth += 1
    elif char in ')]}':
      depth -= 1
    if char == ',' and depth == 0:
      values.append(current.strip())
      current = ''
    else:
      current += char
  values.append(current.strip())
  if depth != 0 or any(v == '' for v in values):
    raise ValueError(f'cannot split {text!r} into values')
  return values


def parse_sweep(spec: str) -> tuple[str, list[str]]:
  """`'optim.learning_rate=1e-4,3e-4'` -> ('optim.learning_rate', ['1e-4', '3e-4'])."""
  key, sep, values = spec.partition('=')
  key = key.strip().removeprefix('--config.')
  if not sep or not re.fullmatch(r'[A-Za-z_]\w*(\.[A-Za-z_]\w*)+', key):
    raise ValueError(f'--sweep={spec!r}: expected SECTION.FIELD=V1,V2,...')
  return key, split_values(values)


def expand(specs: Sequence[str]) -> list[dict[str, str]]:
  """The cartesian product of the sweeps, first sweep outermost: [{key: value, ...}, ...]."""
  sweeps = [parse_sweep(s) for s in specs]
  keys = [k for k, _ in sweeps]
  if len(set(keys)) != len(keys):
    raise ValueError(f'a field is swept twice: {keys}')
  return [
    dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(v for _, v in sweeps))
  ]


def run_name(overrides: dict[str, str]) -> str:
  """A workdir name from the overrides: `learning_rate=1e-4_seed=0` (safe for paths and comma lists)."""
  fields = [k.rsplit('.', 1)[-1] for k in overrides]
  parts = []
  for (key, value), field in zip(overrides.items(), fields, strict=True):
    label = field if fields.count(field) == 1 else key
    parts.append(f'{label}={re.sub(r"[^A-Za-z0-9._+-]+", "-", value).strip("-")}')
  return '_'.join(parts) or 'base'


def main_args(base: str, overrides: dict[str, str], workdir: str) -> list[str]:
  """`python -m ms_cxr.main` arguments of one job."""
  return [
    *shlex.split(base),
    f'--workdir={workdir}',
    *(f'--config.{key}={value}' for key, value in overrides.items()),
  ]


def k8s_manifest(template: list[dict], name: str, args: list[str]) -> list[dict]:
  """launch/k8s_job.yaml's documents with the Service, Job and coordinator renamed to `name` and the args set."""
  docs = copy.deepcopy(template)
  for doc in docs:
    doc['metadata']['name'] = name
    if doc['kind'] == 'Service':
      doc['spec']['selector']['job-name'] = name
    elif doc['kind'] == 'Job':
      pod = doc['spec']['template']['spec']
      pod['subdomain'] = name
      container = pod['containers'][0]
      container['args'] = list(args)
      for env in container['env']:
        if env['name'] == 'JAX_COORDINATOR_ADDRESS':
          port = env['value'].rsplit(':', 1)[1]
          env['value'] = f'{name}-0.{name}:{port}'
  return docs


def k8s_name(prefix: str, index: int) -> str:
  """A Job/Service name (DNS label: lowercase letters, digits, '-'; short enough for `<name>-<index>` pods)."""
  prefix = re.sub(r'[^a-z0-9-]+', '-', prefix.lower()).strip('-')[:40] or 'ms-cxr'
  return f'{prefix}-{index:03d}'


def job_command(
  launcher: str, args: list[str], *, name: str, launcher_args: Sequence[str] = ()
) -> list[str]:
  """The command that starts one job (for k8s: applies the manifest written for `name`)."""
  if launcher == 'local':
    extra = [*launcher_args, '--'] if launcher_args else []
    return [os.path.join(LAUNCH_DIR, 'local.sh'), *extra, *args]
  if launcher == 'slurm':
    return [
      'sbatch',
      f'--job-name={name}',
      *launcher_args,
      os.path.join(LAUNCH_DIR, 'slurm.sbatch'),
      *args,
    ]
  if launcher == 'tpu_pod':
    return [os.path.join(LAUNCH_DIR, 'tpu_pod.sh'), *launcher_args, '--', *args]
  if launcher == 'k8s':
    return ['kubectl', 'apply', '-f', name]
  raise ValueError(f'--launcher={launcher!r}; expected one of {LAUNCHERS}')


def plan(
  launcher: str,
  base: str,
  specs: Sequence[str],
  workdir_root: str,
  launcher_args: Sequence[str] = (),
  name_prefix: str = 'ms-cxr',
  manifest_dir: str = '',
) -> list[tuple[str, list[str]]]:
  """[(run name, command)] for every combination; for k8s the command applies MANIFEST_DIR/<job>.yaml."""
  combos = expand(specs)
  names = [run_name(o) for o in combos]
  if len(set(names)) != len(names):
    raise ValueError(f'two combinations get the same workdir name: {names}')
  jobs = []
  for index, (overrides, name) in enumerate(zip(combos, names, strict=True)):
    args = main_args(base, overrides, os.path.join(workdir_root, name))
    if launcher == 'k8s':
      target = os.path.join(
        manifest_dir or DEFAULT_MANIFEST_DIR, k8s_name(name_prefix, index) + '.yaml'
      )
      jobs.append((name, job_command('k8s', args, name=target)))
    else:
      job = f'{name_prefix}-{name}' if launcher == 'slurm' else name
      jobs.append((name, job_command(launcher, args, name=job, launcher_args=launcher_args)))
  return jobs


def write_k8s_manifests(
  base: str,
  specs: Sequence[str],
  workdir_root: str,
  name_prefix: str = 'ms-cxr',
  manifest_dir: str = '',
) -> list[str]:
  """Writes one rendered launch/k8s_job.yaml per combination to MANIFEST_DIR; returns the paths."""
  import yaml

  with open(os.path.join(LAUNCH_DIR, 'k8s_job.yaml')) as f:
    template = list(yaml.safe_load_all(f))
  # WORKDIR_ROOT is the pods' path (a volume mounted there), rarely one this machine can write to.
  manifest_dir = manifest_dir or DEFAULT_MANIFEST_DIR
  os.makedirs(manifest_dir, exist_ok=True)
  paths = []
  for index, overrides in enumerate(expand(specs)):
    job = k8s_name(name_prefix, index)
    args = main_args(base, overrides, os.path.join(workdir_root, run_name(overrides)))
    path = os.path.join(manifest_dir, job + '.yaml')
    with open(path, 'w') as f:
      yaml.safe_dump_all(k8s_manifest(template, job, args), f, sort_keys=False)
    paths.append(path)
  return paths


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument('--launcher', choices=LAUNCHERS, default='local')
  parser.add_argument('--base', default='', help='ms_cxr.main arguments shared by every job')
  parser.add_argument(
    '--sweep', action='append', default=[], help='SECTION.FIELD=V1,V2,... (repeat for a grid)'
  )
  parser.add_argument('--workdir_root', required=True, help='one workdir per job is made under it')
  parser.add_argument('--launcher_args', default='', help="the launcher's own options, one string")
  parser.add_argument('--name', default='ms-cxr', help='job name prefix (slurm, k8s)')
  parser.add_argument(
    '--manifest_dir', default='', help=f'k8s: where manifests go (default ./{DEFAULT_MANIFEST_DIR})'
  )
  parser.add_argument('--submit', action='store_true', help='run the commands (default: print)')
  options = parser.parse_args(argv)
  launcher_args = shlex.split(options.launcher_args)
  try:
    jobs = plan(
      options.launcher,
      options.base,
      options.sweep,
      options.workdir_root,
      launcher_args,
      options.name,
      options.manifest_dir,
    )
    if options.launcher == 'k8s':
      write_k8s_manifests(
        options.base, options.sweep, options.workdir_root, options.name, options.manifest_dir
      )
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  except OSError as e:
    print(f'error: cannot write the k8s manifests: {e}', file=sys.stderr)
    return 2
  failed = 0
  for _, command in jobs:
    print(shlex.join(command), flush=True)
    if options.submit:
      failed += subprocess.run(command).returncode != 0
  if options.submit:
    print(f'{len(jobs) - failed} of {len(jobs)} jobs ran or were submitted successfully')
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
