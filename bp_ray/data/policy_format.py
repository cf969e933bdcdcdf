"""The text the policy reads and writes: the paper's instruction template around the user prompt, and the rewrite a
completion stands for. SFT trains on it, PPO samples with it, serving and evaluation generate with it."""

from __future__ import annotations

from bp_ray.data.content import split_subject

TEXT_ONLY = {"add_special_tokens": False, "split_special_tokens": True}
"""How the policy's prompts and targets are tokenised, in training and serving alike: no BOS/EOS added (the EOS
ends targets by id), and a user's "</s>" or "<pad>" is the text it reads as, never the control token."""


def format_prompt(instruction: str, low: str, keep_prompt: bool = False) -> str:
    """The paper's template with the user prompt in place of `{raw}`; ends with "Output:", the target follows.
    With keep_prompt the answer is begun with the user prompt itself (`kept_prefix`), so the model only adds."""
    # str.replace, not str.format: user prompts may contain braces ("{cat|dog}" wildcard syntax).
    query = instruction.replace("{raw}", low)
    return f"{query} {kept_prefix(low)}" if keep_prompt else query


def kept_prefix(low: str) -> str:
    """How a keep_prompt answer begins: the user prompt verbatim, then a comma."""
    return low.strip().rstrip(".,") + ","


def policy_text(low: str, completion: str, keep_prompt: bool = False) -> str:
    """The rewrite a generated completion stands for: with keep_prompt, the user prompt and then the completion's
    additions (the user prompt alone when the model adds nothing)."""
    if not keep_prompt:
        return completion
    added = completion.strip().strip(",").strip()
    return f"{kept_prefix(low)} {added}" if added else low.strip()


def sft_target(low: str, high: str, keep_prompt: bool = False) -> str:
    """What SFT teaches the model to write after the template: the high prompt, or with keep_prompt only what the
    high prompt adds after its subject (its first comma segment)."""
    if not keep_prompt:
        return high
    return ", ".join(split_subject(high)[1])
