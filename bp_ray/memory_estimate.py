"""Per-GPU memory of each stage at a config's batch sizes and precision, from the models' shapes: a stated formula,
so a user can size a cluster before a long job (`bp-ray pipeline --dry-run` prints it beside what it measured).

Training (Rajbhandari et al. 2020, ZeRO, Section 3.1): with mixed precision each of Ψ parameters costs 2 bytes of
16-bit weights, 2 of 16-bit gradients and 12 of fp32 optimizer state (master weights, Adam's two moments); in fp32,
4 + 4 + 8. ZeRO stage 1 partitions the optimizer state over the N data-parallel workers, stage 2 the gradients too,
stage 3 the weights too. Activations of a transformer (Korthikanti et al. 2022, Eq. 1, with memory-efficient
attention and no recomputation): 34·s·b·h bytes per layer in 16-bit, for b sequences of s tokens and width h.
The LM head's logits are computed in chunks of positions (float32, with their gradient): 2·b·c·V·4 bytes for a chunk
of c positions over a vocabulary of V. Generation keeps a key/value cache of 2·L·b·s·h 16-bit numbers.
Inference: the weights at the inference dtype, plus the activations (measured, scaled from the dry run's batch and
dtype to the config's) where a formula would be a guess (diffusion, vision towers).
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1024 ** 3
HALF = ("bf16", "fp16", "bfloat16", "float16")


@dataclass(frozen=True)
class LMShape:
    """A decoder LM's dimensions (BLOOM-1b1: 1,065,314,304 parameters, 24 layers, width 1536, 16 heads,
    vocabulary 250,880)."""

    params: int
    layers: int
    hidden: int
    vocab: int


def bytes_per_value(precision: str) -> int:
    return 2 if precision in HALF else 4


def model_state_bytes(params: int, precision: str, zero_stage: int, workers: int) -> float:
    """Weights, gradients and optimizer state of `params` trained parameters on one of `workers` GPUs."""
    weights, grads, optimizer = (2, 2, 12) if precision in HALF else (4, 4, 8)
    n = max(workers, 1)
    return params * (weights / (n if zero_stage >= 3 else 1) + grads / (n if zero_stage >= 2 else 1)
                     + optimizer / (n if zero_stage >= 1 else 1))


def checkpoint_bytes(params: int, precision: str) -> float:
    """A training checkpoint: the weights at the training precision and the optimizer's fp32 states (master
    weights, when 16-bit, and Adam's two moments), gathered over the workers."""
    return params * (bytes_per_value(precision) + (12 if precision in HALF else 8))


def activation_bytes(shape: LMShape, batch: int, seq: int, precision: str) -> float:
    """Saved activations of a forward pass with gradient (Korthikanti et al.: 34·s·b·h per layer at 16-bit)."""
    return 34 * seq * batch * shape.hidden * shape.layers * bytes_per_value(precision) / 2


def logits_bytes(shape: LMShape, batch: int, chunk: int) -> float:
    """One chunk of float32 logits and its gradient (the log-probs never hold all positions at once)."""
    return 2 * batch * chunk * shape.vocab * 4


def kv_cache_bytes(shape: LMShape, batch: int, seq: int, precision: str) -> float:
    return 2 * shape.layers * batch * seq * shape.hidden * bytes_per_value(precision)


def training_bytes(shape: LMShape, trained_models: int, precision: str, zero_stage: int, workers: int,
                   micro_batch: int, seq: int, chunk: int) -> float:
    """One training worker: `trained_models` LMs of this shape (PPO's policy and critic: 2) in one engine, and
    one micro-batch's activations and logits chunk."""
    return (trained_models * model_state_bytes(shape.params, precision, zero_stage, workers)
            + trained_models * activation_bytes(shape, micro_batch, seq, precision)
            + logits_bytes(shape, micro_batch, chunk))


def inference_bytes(params: int, precision: str, activations: float = 0.0) -> float:
    return params * bytes_per_value(precision) + activations


def scaled_activations(measured_peak: float, weight_bytes: float, measured_batch: int, batch: int,
                       measured_precision: str, precision: str) -> float:
    """Activations of a measured run (its peak less its weights), scaled to another batch and dtype."""
    activations = max(measured_peak - weight_bytes, 0.0)
    return activations * batch / max(measured_batch, 1) * bytes_per_value(precision) / bytes_per_value(
        measured_precision)
