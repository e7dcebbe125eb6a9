"""Hugging Face checkpoints as runs and back: `import` and `export` (research/tools/hf/convert.py converts).

  python -m research.tools.hf import HF_DIR WORKDIR [--scan_layers] [--experiment experiments/lm.py:cpu]
  python -m research.tools.hf export WORKDIR HF_DIR [--checkpoint latest] [--max_shard_size 5GB] [--adapters]
  python -m research.tools.hf import PEFT_DIR WORKDIR --base BASE_WORKDIR

`import` writes a step-0 run (an Orbax checkpoint of the train state and config.json, with the
checkpoint's tokenizer.json and end-of-text ids when it has them) that
`launch.py --config experiments/lm.py:from=WORKDIR` fine-tunes, predict.py generates from, and launch.py
trains on. `export` writes a run's evaluation parameters in the layout its experiment's `hf_layout` hook
names, with its tokenizer.json and a generation_config.json holding its end ids; a LoRA run's adapters merged into
its kernels, or with `--adapters` the adapters alone as PEFT saves them (research/tools/hf/peft.py). A PEFT
directory (adapter_config.json) imports onto the run of its base model (`--base`, imported first) as a LoRA run.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

from research import runtime

runtime.configure_process()  # as launch.py: XLA flags, the allocator and a quiet start, before JAX starts

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from research import checkpoint, errors, sharding, steps  # noqa: E402
from research import experiment as experiment_lib  # noqa: E402
from research.errors import ConfigError  # noqa: E402
from research.experiment import hook  # noqa: E402
from research.inference.predict import load_run  # noqa: E402
from research.state import TrainState  # noqa: E402
from research.tools.hf import convert, peft  # noqa: E402
from research.tools.hf.layout import unrolled  # noqa: E402
from research.tree import named_leaves  # noqa: E402

GENERATION = "generation_config.json"


def import_run(source: str | Path, workdir: str | Path, experiment_spec: str, scan_layers: bool) -> str:
    """Writes a step-0 run of the experiment (experiments/lm.py) holding the checkpoint's parameters."""
    hf_config, tensors = convert.read_checkpoint(source)
    layout = convert.layout_of(hf_config)
    if not layout.run_family:
        runs = ", ".join(sorted(name for name, each in convert.LAYOUTS.items() if each.run_family))
        raise ConfigError(
            f"import makes runs of decoder language models ({runs}); use hf.from_hf for {layout.architecture}"
        )
    model = layout.from_config(hf_config)
    if hasattr(model, "scan_layers"):
        model = model.clone(scan_layers=scan_layers)
    params = convert.params_from_tensors(model, tensors, layout)
    path, _, variant = experiment_spec.partition(":")
    module = experiment_lib.load(path)
    config = module.get_config(variant or None)
    config.model.family = layout.run_family
    for field in config.model.keys():  # the experiment names its model settings as the module's fields
        if hasattr(model, field) and field != "dtype":
            value = getattr(model, field)
            config.model[field] = jnp.dtype(value).name if field == "param_dtype" else value
    workdir = Path(workdir)
    if (Path(source) / convert.TOKENIZER).exists():
        workdir.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(source) / convert.TOKENIZER, workdir / convert.TOKENIZER)
        config.data.tokenizer = str((workdir / convert.TOKENIZER).absolute())
    config.data.end_ids = checkpoint_end_ids(source, hf_config)
    config.init_from.workdir = ""
    write_step0(workdir, experiment_lib.name_of(path), module, config, jax.tree.map(jnp.asarray, params))
    return f"imported {source} ({layout.model_type}, {len(tensors)} tensors) into {workdir} as step 0"


def write_step0(workdir: Path, name: str, module, config, params) -> None:
    """A step-0 run of `module` under `config` holding `params` (already in the model's param_dtype)."""
    experiment_lib.claim_workdir(workdir, name, config)
    setup = steps.build(config, module, sharding.make_mesh({"data": 1}, jax.devices()[:1]))
    train_rng = jax.random.split(jax.random.PRNGKey(config.seed))[1]  # as steps.initial_state splits it
    state = TrainState(jnp.zeros((), jnp.int32), params, {}, setup.tx.init(params), train_rng)
    with checkpoint.make_manager(workdir, config.checkpoint) as manager:
        checkpoint.save(manager, 0, state, None, config, force=True)
        manager.wait_until_finished()


def import_adapters(source: str | Path, workdir: str | Path, base: str | Path) -> str:
    """Writes a step-0 LoRA run: the base run's model with PEFT's adapters from `source`."""
    if not base:
        raise ConfigError(f"{source} holds PEFT adapters: name the run of their base model with --base")
    settings = json.loads((Path(source) / peft.CONFIG).read_text())
    tensors = convert.load_file(Path(source) / peft.WEIGHTS)
    run = load_run(base)
    layout = convert.LAYOUTS[experiment_lib.hook(run.module, "hf_layout")(run.config)]
    abstract = named_leaves(jax.eval_shape(unrolled, run.params))
    config = run.config.copy_and_resolve_references()
    config.lora.update(peft.settings_from(settings, tensors, peft.linear_modules(run.model, layout, abstract)))
    config.init_from.workdir = str(Path(base).absolute())
    adapted = steps.build(config, run.module, sharding.make_mesh({"data": 1}, jax.devices()[:1]), features=False)
    params = peft.params_with_adapters(run.model, adapted.abstract_state.params, run.params, tensors, layout)
    write_step0(Path(workdir), run.name, run.module, config, params)
    return f"imported {source} (LoRA rank {config.lora.rank}, {len(tensors)} tensors) onto {base} into {workdir}"


def checkpoint_end_ids(source: str | Path, hf_config: dict) -> tuple[int, ...]:
    """The ids that end a generation: generation_config.json's eos_token_id, else config.json's (one or a list)."""
    generation = Path(source) / GENERATION
    ids = json.loads(generation.read_text()).get("eos_token_id") if generation.exists() else None
    ids = hf_config.get("eos_token_id") if ids is None else ids
    return tuple(ids if isinstance(ids, list) else [] if ids is None else [ids])


def export_run(
    workdir: str | Path, directory: str | Path, which: str, max_shard_bytes: int, adapters: bool = False
) -> str:
    """Writes a trained run's model (its evaluation parameters) as a Hugging Face checkpoint."""
    run = load_run(workdir, which=which, merge=not adapters)
    hf_layout = hook(run.module, "hf_layout")
    if hf_layout is None:
        raise ConfigError(f"experiment {run.name} names no Hugging Face layout (its hf_layout hook): nothing to export")
    if adapters:
        if not run.config.lora.rank:
            raise ConfigError(f"{workdir} has no adapters (lora.rank 0): export its model without --adapters")
        if run.config.lora.also_train:
            raise ConfigError(f"{workdir} trained more than adapters (lora.also_train): export the merged model")
        tensors = peft.adapter_tensors(run.model, run.params, convert.LAYOUTS[hf_layout(run.config)])
        Path(directory).mkdir(parents=True, exist_ok=True)
        convert.save(tensors, Path(directory) / peft.WEIGHTS)
        settings = peft.adapter_config(run.config.lora, tensors, run.config.init_from.workdir)
        (Path(directory) / peft.CONFIG).write_text(json.dumps(settings, indent=2) + "\n")
        return f"exported {workdir} step {run.step}'s adapters ({len(tensors)} tensors) to {directory}"
    convert.to_hf(run.model, run.params, directory, hf_layout(run.config), max_shard_bytes)
    tokenizer_file, end_ids_of = hook(run.module, "tokenizer_file"), hook(run.module, "end_ids")
    if tokenizer_file and tokenizer_file(run.config):
        shutil.copy(tokenizer_file(run.config), Path(directory) / convert.TOKENIZER)
    ends = list(end_ids_of(run.config)) if end_ids_of else []
    if ends:  # transformers' generate stops at any of them
        generation = {"eos_token_id": ends if len(ends) > 1 else ends[0]}
        (Path(directory) / GENERATION).write_text(json.dumps(generation, indent=2) + "\n")
    return f"exported {workdir} step {run.step} ({type(run.model).__name__}) to {directory}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m research.tools.hf", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    importing = commands.add_parser("import", help="a Hugging Face directory -> a step-0 run (WORKDIR)")
    importing.add_argument("source")
    importing.add_argument("workdir")
    importing.add_argument("--experiment", default="experiments/lm.py:cpu", help="the run's experiment[:config]")
    importing.add_argument("--scan_layers", action="store_true", help="stack a Llama's layers under nn.scan")
    importing.add_argument("--base", default="", help="PEFT adapters: the run of their base model")
    exporting = commands.add_parser("export", help="a run (WORKDIR) -> a Hugging Face directory")
    exporting.add_argument("workdir")
    exporting.add_argument("directory")
    exporting.add_argument("--checkpoint", default="latest", help="latest, best or a step")
    exporting.add_argument("--max_shard_size", default="5GB", help="shard the safetensors above this size")
    exporting.add_argument("--adapters", action="store_true", help="a LoRA run's adapters alone, as PEFT saves them")
    arguments = parser.parse_args(argv)
    with errors.exit_on_error():  # a bad input is one line, exit status 2, as in launch.py
        if arguments.command == "import" and (Path(arguments.source) / peft.CONFIG).exists():
            print(import_adapters(arguments.source, arguments.workdir, arguments.base))
        elif arguments.command == "import":
            print(import_run(arguments.source, arguments.workdir, arguments.experiment, arguments.scan_layers))
        else:
            size = convert.parse_size(arguments.max_shard_size)
            args = (arguments.workdir, arguments.directory, arguments.checkpoint, size, arguments.adapters)
            print(export_run(*args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
