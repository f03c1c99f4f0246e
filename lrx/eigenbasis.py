"""EigenLoRAx basis builder (arXiv 2502.04700): principal directions of existing LoRA adapters.

For every adapted module and each of A and B separately: orient each source adapter's
``A_i`` as ``in x r`` and ``B_i`` as ``out x r``, stack the columns of all N adapters
(``M_A = [A_1^T ... A_N^T]``), subtract the mean column, keep the top-K left singular
vectors (``C_A``, ``in x K``; likewise ``C_B``) and optionally append P seeded random
vectors, each orthogonalised against all current columns (Gram-Schmidt, twice) and
normalised. Sources are peft LoRA folders (``adapter_config.json`` +
``adapter_model.safetensors``), including the ``adapter_peft/`` that lrx writes.

Fused MoE experts weights (peft ``target_parameters``, as lrx exports its experts layers) get
one basis per expert, stacked (``C_A`` experts x in x K, ``C_B`` experts x out x K): the paper
builds a basis per adapted weight matrix (per layer and matrix type), and each expert is its own
weight; the intermediate coordinates of ``gate_up_proj``'s output and ``down_proj``'s input are
each expert's own neurons, so a basis shared over the experts would mix unrelated coordinates.
Every expert keeps the same K (the fewest any expert has; augmentation fills up).

Sources are read module by module through ``safetensors.safe_open``, so only one module's
tensors of all adapters are in memory at a time. Output: ``eigenbasis.safetensors``
(``{module}.C_A``, ``{module}.C_B``, explained-variance ratios ``{module}.evr_A/evr_B``)
and ``eigenbasis.json`` (K, P, sources with sha256, modules, shapes, base model).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lrx.errors import LrxError
from lrx.fileio import pickle_files, read_json, read_safetensors
from lrx.rundir import check_writable

log = logging.getLogger(__name__)

# The fused experts weights of transformers' MoE modules (Mixtral, Qwen3-MoE, gpt-oss) in the order
# the modules define them, which is the order peft wraps them in (``_in_module_order``).
WEIGHT_ORDER = ("gate_up_proj", "down_proj")

BASIS_WEIGHTS = "eigenbasis.safetensors"
BASIS_META = "eigenbasis.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class SourceAdapter:
    """One peft LoRA adapter folder, opened lazily."""

    path: Path
    config: dict[str, Any]
    weights: Path
    modules: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]  # module -> (A shape, B shape)
    experts: dict[str, int] = field(default_factory=dict)  # fused experts weight -> number of experts
    keys: dict[str, str] = field(default_factory=dict)  # module -> its peft key where they differ

    @classmethod
    def open(cls, path: str | Path) -> "SourceAdapter":
        """Validate an adapter folder; LrxError naming the file for every problem."""
        path = Path(path)
        if not path.is_dir():
            raise LrxError(f"adapter folder {path} not found")
        if not any(path.iterdir()):
            raise LrxError(f"adapter folder {path} is empty; expected adapter_config.json and adapter_model.safetensors")
        cfg_file = path / "adapter_config.json"
        if not cfg_file.is_file():
            raise LrxError(f"{cfg_file} not found; is {path} a peft LoRA adapter folder?")
        config = read_json(cfg_file, "re-export the adapter")
        if config.get("peft_type", "LORA") != "LORA":
            raise LrxError(f"{cfg_file}: peft_type {config.get('peft_type')!r} is not LORA")
        weights = path / "adapter_model.safetensors"
        if not weights.is_file():
            pickles = pickle_files(path)
            if pickles:
                raise LrxError(
                    f"{path / pickles[0]}: pickle weight files are refused (they can run code when loaded); "
                    "convert the adapter to adapter_model.safetensors"
                )
            raise LrxError(f"{weights} not found")
        shapes: dict[str, dict[str, tuple[int, ...]]] = {}
        try:
            with safe_open(str(weights), framework="pt") as f:
                for key in f.keys():
                    for part in ("A", "B"):
                        marker = f".lora_{part}.weight"
                        if key.endswith(marker):
                            module = key[: -len(marker)].removeprefix("base_model.model.")
                            shapes.setdefault(module, {})[part] = tuple(f.get_slice(key).get_shape())
        except (SafetensorError, OSError) as e:
            raise LrxError(f"{weights}: not a valid safetensors file ({e})") from None
        broken = [m for m, s in shapes.items() if set(s) != {"A", "B"}]
        if broken or not shapes:
            raise LrxError(f"{weights}: no complete lora_A/lora_B pairs (modules {broken[:3] or 'none'})")
        adapter = cls(path, config, weights, {m: (s["A"], s["B"]) for m, s in shapes.items()})
        adapter._name_parameters()
        return adapter

    def _name_parameters(self) -> None:
        """Name the fused experts weights of a ``target_parameters`` adapter by their parameter
        (peft stores them under the experts module, one ``.base_layer`` deeper per weight of the
        same module that it wraps later, in the module's order) and count their experts
        (``lora_A``: rank x experts rows)."""
        targets = self.config.get("target_parameters") or []
        for key in list(self.modules):
            module, depth = key, 0
            while module.endswith(".base_layer"):
                module, depth = module.removesuffix(".base_layer"), depth + 1
            named = [(f"{module}.{t.rsplit('.', 1)[-1]}", t) for t in targets]
            siblings = self._in_module_order([n for n, t in named if n == t or n.endswith("." + t)], targets)
            if depth >= len(siblings):
                continue  # a linear layer's pair
            name = siblings[len(siblings) - 1 - depth]
            a_shape, b_shape = self.modules.pop(key)
            k = _rank_of(self.config, name)
            if a_shape[0] % k or b_shape[1] != a_shape[0]:
                raise LrxError(f"{self.weights}: {key} has lora_A {a_shape} and lora_B {b_shape}, not rank {k} per "
                               "expert; this target_parameters adapter is broken")
            self.modules[name], self.keys[name], self.experts[name] = (a_shape, b_shape), key, a_shape[0] // k

    def _in_module_order(self, siblings: list[str], targets: list[str]) -> list[str]:
        """The weights of one experts module in the order peft wrapped them (the module's): as
        listed where the list names full parameters (lrx's exports list them in module order);
        peft writes its patterns in no fixed order, so those follow ``WEIGHT_ORDER``."""
        if len(siblings) < 2 or all(n in targets for n in siblings):
            return siblings
        leaves = [n.rsplit(".", 1)[-1] for n in siblings]
        if not set(leaves) <= set(WEIGHT_ORDER):
            raise LrxError(f"{self.path}: target_parameters {leaves} of one module, in an order peft does not record; "
                           f"lrx knows the order of {', '.join(WEIGHT_ORDER)} only: target one weight per module")
        return sorted(siblings, key=lambda n: WEIGHT_ORDER.index(n.rsplit(".", 1)[-1]))

    def read(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A^T, B)`` of one module as float64 (in x r, out x r; a fused experts weight's per
        expert: experts x in x r, experts x out x r); LrxError on NaN/Inf."""
        key = self.keys.get(module, module)
        with safe_open(str(self.weights), framework="pt") as f:
            A = f.get_tensor(f"base_model.model.{key}.lora_A.weight").double()
            B = f.get_tensor(f"base_model.model.{key}.lora_B.weight").double()
        for name, t in (("lora_A", A), ("lora_B", B)):
            if not torch.isfinite(t).all():
                raise LrxError(f"{self.weights}: {module}.{name} contains NaN or Inf; this adapter is broken")
        if module in self.experts:  # peft's layout: A expert-major rows, B rank-major columns
            E = self.experts[module]
            A, B = A.reshape(E, -1, A.shape[-1]), B.reshape(B.shape[0], -1, E).permute(2, 0, 1)
        return A.transpose(-1, -2), B


def _rank_of(config: dict[str, Any], name: str) -> int:
    """The rank peft's ``rank_pattern`` (full names or suffixes) or ``r`` gives module ``name``."""
    for pattern, rank in (config.get("rank_pattern") or {}).items():
        if name == pattern or name.endswith("." + pattern):
            return int(rank)
    return int(config.get("r", 8))


def principal_basis(
    M: torch.Tensor, k: int, augment: int, seed: int, label: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k principal directions of the columns of ``M`` (dim x n), plus ``augment`` random ones.

    Args:
        M: stacked adapter columns (float64).
        k: components to keep; fewer are kept (with a warning) when the centred data has lower rank.
        augment: random orthonormal vectors to append (seeded).
        seed: seed of the augmentation.
        label: module and matrix type, for messages.

    Returns:
        ``C`` (dim x k', orthonormal columns, float64) and the explained-variance ratio of the
        kept components (k,).
    """
    centred = M - M.mean(dim=1, keepdim=True)
    U, S, _ = torch.linalg.svd(centred, full_matrices=False)
    variance = S**2
    total = variance.sum()
    rank = int((S > S[0] * 1e-10).sum()) if S.numel() and S[0] > 0 else 0
    kept = min(k, rank)
    if kept < k:
        log.warning(
            "%s: only %d principal components exist (%d stacked columns after centring), %d were asked for%s",
            label, kept, M.shape[1], k, "; augmentation fills in" if augment else "; pass --augment to fill up",
        )
    evr = variance[:kept] / total if total > 0 else torch.zeros(kept, dtype=M.dtype)
    return augmented(U[:, :kept], augment, seed), evr


def augmented(C: torch.Tensor, augment: int, seed: int) -> torch.Tensor:
    """``C`` (dim x k, orthonormal columns) with ``augment`` seeded random columns appended (at
    most dim - k), each orthogonalised against all current columns and normalised."""
    dim = C.shape[0]
    gen = torch.Generator().manual_seed(seed)
    extra = []
    for _ in range(min(augment, dim - C.shape[1])):
        v = torch.randn(dim, generator=gen, dtype=torch.float64)
        for _ in range(2):  # Gram-Schmidt twice: "twice is enough" (Giraud et al. 2005)
            basis = torch.cat([C, *[e[:, None] for e in extra]], dim=1)
            v = v - basis @ (basis.t() @ v)
        extra.append(v / v.norm())
    return torch.cat([C, *[e[:, None] for e in extra]], dim=1)


def experts_basis(M: torch.Tensor, k: int, augment: int, seed: int, label: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``principal_basis`` of each expert's columns (``M``: experts x dim x n), stacked: ``C``
    (experts x dim x k') and the explained-variance ratios (experts x k'), every expert cut to
    the fewest principal components any expert has (then augmented alike)."""
    per_expert = [principal_basis(m, k, augment, seed, f"{label} expert {e}") for e, m in enumerate(M)]
    kept = min(evr.numel() for _, evr in per_expert)
    # Augmented after the cut, each expert with its own seed: every expert has kept + P columns.
    C = torch.stack([augmented(C[:, :kept], augment, seed + 7919 * e) for e, (C, _) in enumerate(per_expert)])
    return C, torch.stack([evr[:kept] for _, evr in per_expert])


def open_sources(sources: list[str | Path]) -> list[SourceAdapter]:
    """The source adapters, each once, all of one base model and one set of module shapes.

    Raises:
        LrxError: an adapter given twice (by path or content), or sources that do not fit together.
    """
    seen: dict[Path, str] = {}
    for s in sources:
        real = Path(s).resolve()
        if real in seen:
            raise LrxError(f"adapter {s} is given twice (also as {seen[real]}); each source adapter counts once")
        seen[real] = str(s)
    adapters = [SourceAdapter.open(s) for s in sources]
    digests = {}
    for a in adapters:
        digest = sha256_file(a.weights)
        if digest in digests:
            raise LrxError(f"{a.weights} is the same adapter as {digests[digest]} (same sha256); each source "
                           "adapter counts once")
        digests[digest] = a.weights
    ref = adapters[0]
    for a in adapters[1:]:
        base_a, base_r = a.config.get("base_model_name_or_path"), ref.config.get("base_model_name_or_path")
        if base_a and base_r and base_a != base_r:
            raise LrxError(f"{a.path}: trained on base model {base_a!r}, but {ref.path} on {base_r!r}; "
                           "all sources must share one base model")
        missing, extra = sorted(set(ref.modules) - set(a.modules)), sorted(set(a.modules) - set(ref.modules))
        if missing or extra:
            raise LrxError(f"{a.weights}: target modules differ from {ref.weights} "
                           f"(missing {missing[:3]}, extra {extra[:3]}); all sources must adapt the same modules")
        for module, (sa, sb) in a.modules.items():
            ra, rb = ref.modules[module]
            if sa[1] != ra[1] or sb[0] != rb[0] or a.experts.get(module) != ref.experts.get(module):
                raise LrxError(f"{a.weights}: {module} has shape in={sa[1]}, out={sb[0]}, experts "
                               f"{a.experts.get(module)} but {ref.weights} has in={ra[1]}, out={rb[0]}, experts "
                               f"{ref.experts.get(module)}; the adapters belong to different base models")
    return adapters


def _write_weights(out: Path, tensors: dict[str, torch.Tensor]) -> str:
    """Write the basis tensors (replacing an earlier file in one rename); returns their sha256."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (BASIS_WEIGHTS + ".tmp")
    # One metadata key only: safetensors writes the metadata map in no fixed order, and the
    # file must be byte-identical across builds (its sha256 names the basis).
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(out / BASIS_WEIGHTS)
    return sha256_file(out / BASIS_WEIGHTS)


def build_basis(
    sources: list[str | Path], out: str | Path, *, k: int, augment: int = 0, seed: int = 0,
) -> dict[str, Any]:
    """Build an EigenLoRAx basis from peft LoRA adapters and write it to ``out``.

    Args:
        sources: adapter folders (all for the same base model and modules).
        out: output folder (created; existing basis files are replaced atomically).
        k: principal components per module and matrix type.
        augment: P, random orthonormal vectors appended per module and matrix type.
        seed: augmentation seed (module i uses seed + i).

    Returns:
        The metadata written to ``eigenbasis.json``.

    Raises:
        LrxError: unreadable, inconsistent or broken sources (the message names the file).
    """
    if not sources:
        raise LrxError("no source adapters given")
    if k < 1 or augment < 0:
        raise LrxError(f"K must be >= 1 and P >= 0 (got K={k}, P={augment})")
    out = Path(out)
    check_writable(out, "OUT")
    adapters = open_sources(sources)
    ref = adapters[0]
    tensors: dict[str, torch.Tensor] = {}
    summary: dict[str, dict[str, list[float]]] = {}
    shapes = {}
    kept: list[int] = []  # principal components actually kept, per module and matrix
    for index, module in enumerate(sorted(ref.modules)):
        As, Bs = zip(*(a.read(module) for a in adapters))  # one module of every adapter at a time
        for part, cols in (("A", As), ("B", Bs)):
            basis = principal_basis if cols[0].dim() == 2 else experts_basis
            C, evr = basis(torch.cat(cols, dim=-1), k, augment, seed + 2 * index + (part == "B"), f"{module}.{part}")
            kept.append(evr.shape[-1])
            tensors[f"{module}.C_{part}"] = C.float().contiguous()
            tensors[f"{module}.evr_{part}"] = evr.float().contiguous()
            kind = module.rsplit(".", 1)[-1]
            summary.setdefault(kind, {}).setdefault(part, []).append(float(evr.sum(-1).mean()))
        shapes[module] = {"in": ref.modules[module][0][1], "out": ref.modules[module][1][0]}
        if module in ref.experts:
            shapes[module]["experts"] = ref.experts[module]
    meta = {
        "format": "lrx-eigenbasis",
        "k": max(kept),  # what the tensors hold: fewer than asked when the sources have fewer columns
        "k_requested": k,
        "augment": augment,
        "seed": seed,
        "sha256": _write_weights(out, tensors),
        "base_model": ref.config.get("base_model_name_or_path"),
        "target_modules": sorted(ref.modules),
        "shapes": shapes,
        "sources": [{"path": str(a.path), "name": a.path.name, "sha256": sha256_file(a.weights)} for a in adapters],
        "explained_variance_kept": {
            kind: {part: sum(v) / len(v) for part, v in parts.items()} for kind, parts in summary.items()
        },
    }
    (out / BASIS_META).write_text(json.dumps(meta, indent=2))
    return meta


def format_summary(meta: dict[str, Any]) -> str:
    """One line per layer type: mean explained variance kept for A and B."""
    lines = [f"basis of {len(meta['sources'])} adapters, K={meta['k']}, P={meta['augment']}, "
             f"{len(meta['target_modules'])} modules, sha256 {meta['sha256'][:16]}"]
    for kind, parts in sorted(meta["explained_variance_kept"].items()):
        lines.append(f"  {kind}: explained variance kept A {parts['A']:.3f}, B {parts['B']:.3f}")
    return "\n".join(lines)


def load_basis(path: str | Path, expected_sha256: str | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a basis folder; LrxError if missing, corrupt or not the expected one."""
    path = Path(path)
    meta_file, weights = path / BASIS_META, path / BASIS_WEIGHTS
    if not meta_file.is_file() or not weights.is_file():
        raise LrxError(f"{path} is not an EigenLoRAx basis (needs {BASIS_META} and {BASIS_WEIGHTS}); "
                       "build one with tools/build_eigenbasis.py")
    meta = read_json(meta_file, "rebuild the basis")
    digest = sha256_file(weights)
    if digest != meta.get("sha256"):
        raise LrxError(f"{weights}: sha256 {digest[:16]} does not match {meta_file} ({str(meta.get('sha256'))[:16]}); "
                       "the basis file was changed or is corrupt")
    if expected_sha256 and digest != expected_sha256:
        raise LrxError(f"{weights}: this basis (sha256 {digest[:16]}) is not the one the adapter was trained on "
                       f"({expected_sha256[:16]}); point method.basis at the original basis")
    tensors = read_safetensors(weights)
    for key, t in tensors.items():  # a NaN here would surface as a NaN loss blamed on train.lr
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise LrxError(f"{weights}: {key} contains NaN or Inf; the basis is broken, rebuild it with lrx eigenbasis")
    return meta, tensors
