"""The `powerinfer build` artifact: writing, verifying and reading it (format: docs/ARTIFACT.md).

An artifact is one directory holding a model whose FFN neurons are reordered hot-first (PowerInfer §4.2:
hot neurons are preloaded on the GPU, so the GPU part of each layer is one contiguous prefix), its
activation predictors, the profile they came from and a placement for one VRAM budget. Permuting the
neurons of a gated FFN consistently (rows of gate and up, columns of down) leaves its function unchanged,
so `ArtifactCheckpoint.weights` maps the reordered FFN back to an ordinary dense model for `load_model`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
from datetime import datetime, timezone
from pathlib import Path

import torch

from powerinfer.errors import ModelFormatError, PowerInferError
from powerinfer.loading.tokenizer import Tokenizer

FORMAT = "powerinfer-artifact"
FORMAT_VERSION = 2  # 2: predictors of either kind (models.predictor); 1 is read too
PLACEMENT_FILE = "placement.json"
CHECKSUMMED_FILES = ("tokenizer.json", "model.safetensors", "predictors.safetensors", "profile.safetensors")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def source_fingerprint(checkpoint) -> str:
    """sha256 of a checkpoint: the GGUF file's, or for a model directory the hash of its config's and
    weight files' hashes."""
    if checkpoint.format == "gguf":
        return sha256_file(checkpoint.path)
    if checkpoint.format == "artifact":
        return checkpoint.manifest["source"]["sha256"]
    files = [checkpoint.path / "config.json", *checkpoint.files]
    listing = "\n".join(f"{f.name} {sha256_file(f)}" for f in files)
    return hashlib.sha256(listing.encode()).hexdigest()


@contextlib.contextmanager
def atomic_directory(dest: str | Path, force: bool = False):
    """Yields a fresh sibling temp directory that becomes `dest` only if the block completes."""
    dest = Path(dest)
    if dest.exists() and not force:
        raise PowerInferError(f"{dest} already exists (pass --force to replace it)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f"{dest.name}.tmp-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        yield tmp
        if dest.exists():  # replace: move the old one aside first so that `dest` is never half-written
            old = dest.parent / f"{dest.name}.old-{secrets.token_hex(4)}"
            dest.rename(old)
            tmp.rename(dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.parent / f".{path.name}.tmp-{secrets.token_hex(4)}"
    try:
        tmp.write_text(json.dumps(obj, indent=1))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFormatError(f"{path}: cannot read JSON ({e})") from None


def reorder_ffn(weights: dict[str, torch.Tensor], layer: int, order: torch.Tensor) -> dict[str, torch.Tensor]:
    """One layer's FFN in artifact layout: gate/up rows and transposed down rows in `order`."""
    p = f"model.layers.{layer}.mlp."
    return {
        p + "gate_proj.weight": weights[p + "gate_proj.weight"][order].contiguous(),
        p + "up_proj.weight": weights[p + "up_proj.weight"][order].contiguous(),
        p + "down_proj_t.weight": weights[p + "down_proj.weight"].T[order].contiguous(),
        p + "neuron_order": order.to(torch.int64).contiguous(),
    }


def write_artifact(dest: str | Path, *, config: dict, tokenizer: Tokenizer, source: dict, build: dict,
                   strategy: dict, layers: list[dict], weights: dict[str, torch.Tensor],
                   orders: list[torch.Tensor], predictors: list, profile: list[dict[str, torch.Tensor]],
                   placement: dict, rope_freq_factors: torch.Tensor | None = None,
                   force: bool = False) -> Path:
    """Write an artifact atomically.

    `weights`: Hugging Face names in the checkpoint's neuron order; `orders[i]`: layer i's hot-first order
    (original neuron ids); `predictors` (models.predictor) and `profile` (per layer `frequency`,
    `mean_abs`, `max_abs`) are in the original order too and are permuted here; `layers` and `placement`
    already refer to the hot-first order.
    """
    from safetensors.torch import save_file

    from powerinfer.models.predictor import predictor_state

    dest = Path(dest)
    with atomic_directory(dest, force=force) as tmp:
        tokenizer.backend.save(str(tmp / "tokenizer.json"))
        model = {k: v.contiguous() for k, v in weights.items()
                 if ".mlp." not in k or not k.startswith("model.layers.")}
        for i, order in enumerate(orders):
            model.update(reorder_ffn(weights, i, order))
        if rope_freq_factors is not None:
            model["rope_freqs"] = rope_freq_factors.float().contiguous()
        save_file(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tensors = {}
        for i, (predictor, order) in enumerate(zip(predictors, orders)):
            tensors.update({f"layers.{i}.{k}": v for k, v in predictor_state(predictor.reordered(order)).items()})
        save_file(tensors, str(tmp / "predictors.safetensors"))
        save_file({f"layers.{i}.{name}": t.float()[order].contiguous()
                   for i, (stats, order) in enumerate(zip(profile, orders)) for name, t in stats.items()},
                  str(tmp / "profile.safetensors"))
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "source": source, "config": config,
            "tokenizer": {"bos_token_id": tokenizer.bos_token_id, "eos_token_ids": tokenizer.eos_token_ids,
                          "add_bos": tokenizer.add_bos, "chat_template": tokenizer.chat_template,
                          "kind": tokenizer.kind},
            "build": build, "strategy": strategy, "layers": layers,
            "files": {name: sha256_file(tmp / name) for name in CHECKSUMMED_FILES},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        placement = dict(placement, manifest_sha256=sha256_file(tmp / "manifest.json"))
        (tmp / PLACEMENT_FILE).write_text(json.dumps(placement, indent=1))
    return dest


class ArtifactCheckpoint:
    """A verified artifact, readable wherever a checkpoint is (`open_checkpoint`, `load_model`)."""

    format = "artifact"

    def __init__(self, path: Path):
        self.path = Path(path)
        self.manifest = _read_json(self.path / "manifest.json")
        m = self.manifest
        if m.get("format") != FORMAT:
            raise ModelFormatError(f"{self.path}: manifest.json is not a {FORMAT} manifest")
        version = m.get("format_version")
        if not isinstance(version, int):
            raise ModelFormatError(f"{self.path}: manifest.json has no format_version")
        if version > FORMAT_VERSION:
            raise ModelFormatError(f"{self.path}: artifact format version {version} is newer than this "
                                   f"powerinfer reads (up to {FORMAT_VERSION}); upgrade powerinfer or rebuild")
        for name in CHECKSUMMED_FILES:
            expected = m.get("files", {}).get(name)
            file = self.path / name
            if expected is None:
                raise ModelFormatError(f"{self.path}: manifest.json lists no checksum for {name}")
            if not file.is_file():
                raise ModelFormatError(f"{self.path}: {name} is missing")
            if sha256_file(file) != expected:
                raise ModelFormatError(f"{file}: checksum mismatch (corrupted or modified file); rebuild the artifact")
        self.config = m["config"]
        self._check_shapes()
        self._tokenizer: Tokenizer | None = None

    def _open(self, name: str):
        from safetensors import safe_open
        try:
            return safe_open(str(self.path / name), framework="pt")
        except Exception as e:  # safetensors raises its own error type on corrupt headers
            raise ModelFormatError(f"{self.path / name}: corrupt safetensors file ({e})") from None

    def _check_shapes(self) -> None:
        d, n_ff = self.config["hidden_size"], self.config["intermediate_size"]
        n_layers = self.config["num_hidden_layers"]
        if len(self.manifest.get("layers", [])) != n_layers:
            raise ModelFormatError(f"{self.path}: manifest.json describes {len(self.manifest.get('layers', []))} "
                                   f"layers, the config {n_layers}")
        with self._open("model.safetensors") as f:
            names = set(f.keys())
            for i in range(n_layers):
                p = f"model.layers.{i}.mlp."
                for name, shape in (("gate_proj.weight", [n_ff, d]), ("up_proj.weight", [n_ff, d]),
                                    ("down_proj_t.weight", [n_ff, d]), ("neuron_order", [n_ff])):
                    if p + name not in names:
                        raise ModelFormatError(f"{self.path}: model.safetensors has no {p + name}")
                    if list(f.get_slice(p + name).get_shape()) != shape:
                        raise ModelFormatError(f"{self.path}: {p + name} has shape "
                                               f"{list(f.get_slice(p + name).get_shape())}, the config implies {shape}")
                order = f.get_tensor(p + "neuron_order")
                if not torch.equal(order.sort().values, torch.arange(n_ff)):
                    raise ModelFormatError(f"{self.path}: {p}neuron_order is not a permutation")

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            from tokenizers import Tokenizer as HFTokenizer
            backend = HFTokenizer.from_file(str(self.path / "tokenizer.json"))
            t = self.manifest["tokenizer"]
            special = {backend.token_to_id(tok.content)
                       for tok in backend.get_added_tokens_decoder().values() if tok.special}
            self._tokenizer = Tokenizer(backend, t["bos_token_id"], list(t["eos_token_ids"]), t["add_bos"],
                                        t.get("chat_template"), t.get("kind", "bpe"), special)
        return self._tokenizer

    def tensor_info(self) -> list[dict]:
        info = []
        with self._open("model.safetensors") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                shape = list(sl.get_shape())
                size = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8}.get(sl.get_dtype(), 4)
                info.append({"name": name, "shape": shape, "type": sl.get_dtype(),
                             "bytes": size * int(torch.tensor(shape).prod()) if shape else size})
        return info

    @property
    def num_tensors(self) -> int:
        with self._open("model.safetensors") as f:
            return sum(1 for name in f.keys() if not name.endswith("neuron_order") and name != "rope_freqs")

    def rope_freq_factors(self) -> torch.Tensor | None:
        with self._open("model.safetensors") as f:
            return f.get_tensor("rope_freqs") if "rope_freqs" in f.keys() else None

    def weights(self, dtype: torch.dtype, progress=None):
        """Hugging Face names and tensors of the dense model, FFN in hot-first order (down transposed back)."""
        with self._open("model.safetensors") as f:
            for name in f.keys():
                if name.endswith("neuron_order") or name == "rope_freqs":
                    continue
                tensor = f.get_tensor(name)
                if name.endswith("mlp.down_proj_t.weight"):
                    name, tensor = name.replace("down_proj_t", "down_proj"), tensor.T
                if progress is not None:
                    progress.update(1)
                yield name, tensor.to(dtype).contiguous()

    def neuron_orders(self) -> list[torch.Tensor]:
        with self._open("model.safetensors") as f:
            return [f.get_tensor(f"model.layers.{i}.mlp.neuron_order")
                    for i in range(self.config["num_hidden_layers"])]

    def predictors(self, device="cpu") -> list:
        """The per-layer predictors (models.predictor; outputs in hot-first order)."""
        from powerinfer.models.predictor import predictor_from_state

        d, n_ff = self.config["hidden_size"], self.config["intermediate_size"]
        out = []
        with self._open("predictors.safetensors") as f:
            names = list(f.keys())
            for i in range(self.config["num_hidden_layers"]):
                prefix = f"layers.{i}."
                state = {name[len(prefix):]: f.get_tensor(name) for name in names if name.startswith(prefix)}
                out.append(predictor_from_state(state, d, n_ff).to(device).eval())
        return out

    def profile(self) -> list[dict[str, torch.Tensor]]:
        """Per layer `frequency`, `mean_abs`, `max_abs` (hot-first order)."""
        with self._open("profile.safetensors") as f:
            names = list(f.keys())
            out = [{} for _ in range(self.config["num_hidden_layers"])]
            for name in names:
                _, i, stat = name.split(".", 2)
                out[int(i)][stat] = f.get_tensor(name)
        return out

    def placement(self) -> dict | None:
        """placement.json, checked to belong to this artifact and to fit its shapes (None if absent)."""
        file = self.path / PLACEMENT_FILE
        if not file.exists():
            return None
        placement = _read_json(file)
        if placement.get("manifest_sha256") != sha256_file(self.path / "manifest.json"):
            raise ModelFormatError(f"{file}: belongs to another artifact; re-plan with "
                                   f"`powerinfer plan --model {self.path} --vram-budget GiB`")
        n_ff = self.config["intermediate_size"]
        layers = placement.get("layers", [])
        if len(layers) != self.config["num_hidden_layers"] or not all(
                0 <= layer.get("n_gpu_neurons", -1) <= n_ff for layer in layers):
            raise ModelFormatError(f"{file}: layer placements do not fit the model")
        return placement

    def write_placement(self, placement: dict) -> None:
        write_json_atomic(self.path / PLACEMENT_FILE,
                          dict(placement, manifest_sha256=sha256_file(self.path / "manifest.json")))
