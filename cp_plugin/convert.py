"""Turn a checkpoint into what diffusers loads: ``python -m cp_plugin.convert <checkpoint> <out dir>``.

Each diffusers model the checkpoint recorded (attribute path, class, config: ``models.json`` in a
sharded directory, the ``diffusers_models`` entry of a one-file checkpoint) is rebuilt from its
config, its weights are read in one process (from the DCP shards with
``torch.distributed.checkpoint.load``, ``no_dist``: no process group, any number of saving ranks;
or from the file's ``state_dict``), and it is written to ``<out dir>/<attribute path>``:

- with ``save_pretrained`` (a folder ``Model.from_pretrained`` loads), or
- for a LoRA run (the model had peft adapters), the adapters alone in diffusers' LoRA format:
  ``pytorch_lora_weights.safetensors`` with ``transformer.`` -prefixed keys and the adapter config as
  metadata, the file a pipeline's ``load_lora_weights`` reads. The frozen base is not written: it is
  the pretrained model the run started from (and a LoRA checkpoint may not hold it).

Also takes an Accelerate ``save_state`` folder (its ``sharded`` subfolder). One-file checkpoints
(DDP runs, ``save_distributed_checkpoint=False``) are read whole into memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

from cp_plugin import checkpoint
from cp_plugin.checkpoint.one_file import MODELS_ENTRY

LORA_PREFIX = "transformer"  # the pipeline component diffusers' LoRA loaders give DiT adapters


def checkpoint_path(path: str | Path) -> Path:
    """The checkpoint at ``path`` (a sharded directory or one file), or inside an Accelerate state folder."""
    path = Path(path)
    if not (path / checkpoint.MODELS_FILE).is_file() and (path / "sharded").is_dir():
        path = path / "sharded"
    checkpoint.check_complete(path)
    return path


def recorded_models(path: Path, saved: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """The diffusers models the checkpoint recorded, by attribute path (``saved``: a one-file checkpoint's contents)."""
    if saved is None:
        recorded = checkpoint.read_models(path)
    else:
        recorded = json.loads(saved.get(MODELS_ENTRY, "{}"))
    if not recorded:
        where = checkpoint.MODELS_FILE if saved is None else f"the {MODELS_ENTRY!r} entry"
        raise ValueError(f"{path} records no diffusers model ({where} missing or empty): it was not written by this "
                         "cp_plugin's strategy or Accelerate plugin, or its module holds no diffusers ModelMixin")
    return recorded


def build(entry: dict[str, Any]) -> torch.nn.Module:
    """The recorded model, initialised from its config, with its LoRA adapters added (weights loaded later)."""
    module_name, _, class_name = entry["class"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    config = {k: v for k, v in entry["config"].items() if not k.startswith("_")}
    model = cls.from_config(config)
    for name, adapter in entry.get("adapters", {}).items():
        from peft import LoraConfig

        fields = {f.name for f in dataclasses.fields(LoraConfig)}
        model.add_adapter(LoraConfig(**{k: v for k, v in adapter.items() if k in fields}), adapter_name=name)
    return model


def load_weights(model: torch.nn.Module, path: Path, saved: dict[str, Any] | None, prefix: str,
                 only_adapters: bool) -> None:
    """Read ``model`` 's weights (or its adapters) from the checkpoint, in place: from its shards (no process group)
    or from a one-file checkpoint's ``saved`` contents."""
    held = checkpoint.saved_keys(path) if saved is None else set(saved[checkpoint.MODEL_KEY])
    wanted = {name: value for name, value in model.state_dict().items()
              if not only_adapters or "lora_" in name}
    missing = sorted(f"{prefix}{name}" for name in wanted if f"{prefix}{name}" not in held)
    if missing:
        raise ValueError(f"checkpoint {path} lacks {len(missing)} weights of {type(model).__name__}, e.g. {missing[:3]}; "
                         "was the model saved with only some of its weights?")
    if saved is not None:
        model.load_state_dict({name: saved[checkpoint.MODEL_KEY][f"{prefix}{name}"] for name in wanted}, strict=False)
        return
    state = {f"{prefix}{name}": value for name, value in wanted.items()}
    with warnings.catch_warnings():  # DCP warns that it reads in one process: that is the point here
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        dcp.load({checkpoint.MODEL_KEY: state}, checkpoint_id=path, no_dist=True)


def write_lora(model: torch.nn.Module, entry: dict[str, Any], out: Path) -> None:
    """The adapters in diffusers' pipeline LoRA format (``load_lora_weights``), their config as metadata."""
    from diffusers.loaders.lora_base import LoraBaseMixin
    from peft.utils import get_peft_model_state_dict

    for name, adapter in entry["adapters"].items():
        layers = LoraBaseMixin.pack_weights(get_peft_model_state_dict(model, adapter_name=name), LORA_PREFIX)
        metadata = {f"{LORA_PREFIX}.{k}": v for k, v in adapter.items()}
        target = out if len(entry["adapters"]) == 1 else out / name
        LoraBaseMixin.write_lora_layers(
            state_dict={k: v.contiguous() for k, v in layers.items()}, save_directory=str(target),
            is_main_process=True, weight_name=None, save_function=None, safe_serialization=True,
            lora_adapter_metadata=metadata,
        )


def convert(source: str | Path, out: str | Path, models: list[str] | None = None) -> dict[str, Path]:
    """Write each recorded diffusers model (or those at the attribute paths ``models``) under ``out``.

    Returns ``{attribute path: folder written}``; the root module's own model goes to ``out/model``.
    """
    path, out = checkpoint_path(source), Path(out)
    saved = None if checkpoint.is_sharded(path) else torch.load(path, map_location="cpu", weights_only=True)
    recorded = recorded_models(path, saved)
    unknown = sorted(set(models or []) - set(recorded))
    if unknown:
        raise ValueError(f"--model {unknown}: the checkpoint records models at {sorted(recorded)}; pick among those")
    written = {}
    for attribute, entry in recorded.items():
        if models and attribute not in models:
            continue
        model = build(entry)
        lora = bool(entry.get("adapters"))
        load_weights(model, path, saved, f"{attribute}." if attribute else "", only_adapters=lora)
        target = out / (attribute or "model")
        if lora:
            write_lora(model, entry, target)
        else:
            model.save_pretrained(target)
        written[attribute] = target
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cp_plugin.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a checkpoint: a sharded directory, one file, or an Accelerate save_state folder")
    parser.add_argument("out", help="where to write: <out>/<attribute path> per diffusers model")
    parser.add_argument("--model", action="append", help="attribute path of one model to convert (repeatable); default: all")
    args = parser.parse_args(argv)
    for attribute, target in convert(args.checkpoint, args.out, args.model).items():
        print(f"{attribute or '<root>'} -> {target}")


if __name__ == "__main__":
    main()
