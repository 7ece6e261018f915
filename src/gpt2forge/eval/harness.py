"""lm-evaluation-harness on our checkpoints of any architecture, without exporting them: ``GPT2ForgeLM``, a
``TemplateLM`` over ``load_model()``, registered with lm-eval as ``gpt2forge``.

From the command line: ``gpt2forge eval --model out/run --lm-eval arc_easy,lambada_openai``. From Python::

    import lm_eval
    import gpt2forge.eval.harness  # registers the "gpt2forge" model
    lm_eval.simple_evaluate(model="gpt2forge", model_args="pretrained=out/run,batch_size=16", tasks=["piqa"])

Log-likelihoods go through the downstream suite's scoring engine (``scoring.py``): requests sorted by length,
``batch_size`` rows a forward pass, the context cut from the left as lm-eval's ``hf`` backend cuts it (the last
``block_size + 1`` tokens). Rolling log-likelihoods use lm-eval's own disjoint windows; generation is greedy
(or sampled when a task asks for it) through ``sample.stream`` with the KV cache. Needs ``pip install
'gpt2forge[lm-eval]'``.
"""

from __future__ import annotations

import torch

from ..errors import UserError

try:
    import lm_eval.models  # noqa: F401 -- lm-eval's own models first: it fills its registry only when empty
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError:  # pragma: no cover -- the message is the point
    raise UserError("lm-evaluation-harness is not installed: pip install 'gpt2forge[lm-eval]' (or pip install "
                    "lm-eval)") from None

from ..tokenizer import EOT_TOKEN, get_tokenizer
from .scoring import Example, padded_length, score_examples


@register_model("gpt2forge")
class GPT2ForgeLM(TemplateLM):
    """One of our models (checkpoint dir, run dir, Hugging Face dir or hub name) as an lm-eval model.

    ``model`` may also be a loaded model (``pretrained`` is then only its name in results)."""

    def __init__(self, pretrained: str = "", model=None, device: str = "cpu", batch_size: int | str = 16,
                 precision: str = "fp32", vocab_dir: str | None = None, **_ignored) -> None:
        super().__init__()
        from ..device import autocast_dtype, pick_device
        from ..weights import load_model

        self._device = pick_device(device)
        self.model = model if model is not None else load_model(pretrained, self._device)
        self.model.eval()
        self.pretrained = pretrained
        self.tokenizer_ = get_tokenizer(vocab_dir)
        self.batch_size = 16 if str(batch_size).startswith("auto") else int(batch_size)
        self.autocast = autocast_dtype(precision, self._device)
        self.max_length = self.model.config.block_size

    # ------------------------------------------------------------------------------------ tokenizer

    @property
    def eot_token_id(self) -> int:
        return EOT_TOKEN

    @property
    def tokenizer_name(self) -> str:
        return "gpt2"

    @property
    def device(self):
        return self._device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer_.encode(string)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer_.decode(tokens)

    # ------------------------------------------------------------------------------ log-likelihoods

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(summed log-prob, greedy) of each continuation after its context, scored longest first."""
        room = self.max_length + 1
        examples = []
        for i, (_, context, continuation) in enumerate(requests):
            if len(continuation) > self.max_length:
                raise UserError(f"lm-eval request {i}: a continuation of {len(continuation)} tokens does not fit the "
                                f"model's context of {self.max_length}")
            context = (context + continuation)[-room:][: -len(continuation)] if continuation else context
            examples.append(Example(i, ((list(context), list(continuation)),), (0,), 0))
        order = sorted(range(len(examples)), key=lambda i: -sum(map(len, examples[i].choices[0])))
        results: list[tuple[float, bool] | None] = [None] * len(examples)
        for start in range(0, len(order), self.batch_size):
            chunk = [examples[i] for i in order[start : start + self.batch_size]]
            scores = score_examples(self.model, chunk, device=self._device, batch_size=len(chunk),
                                    seq_len=padded_length(chunk, self.max_length), autocast_dtype=self.autocast)
            for ex, logprob, greedy in zip(chunk, scores.logprob.tolist(), scores.greedy.tolist()):
                results[ex.line] = (logprob, greedy)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's total log-likelihood, in lm-eval's disjoint windows of at most the model's context."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owners = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(i)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows)):
            totals[owner] += logprob
        return totals

    # ----------------------------------------------------------------------------------- generation

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continue each context until one of its ``until`` strings (cut off) or ``max_gen_toks`` tokens."""
        from ..sample import stream

        outputs = []
        for context, gen_kwargs in (req.args for req in requests):
            kwargs = dict(gen_kwargs)
            until = kwargs.get("until") or [self.tok_decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", 256))
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            tokens = self.tok_encode(context)[-self.max_length:] or [self.eot_token_id]
            idx = torch.tensor([tokens], device=self._device)
            generated, text = [], ""
            device_type = torch.device(self._device).type
            with torch.autocast(device_type, dtype=self.autocast, enabled=self.autocast is not None):
                for token in stream(self.model, idx, max_new, temperature=temperature):
                    if int(token) == self.eot_token_id:
                        break
                    generated.append(int(token))
                    text = self.tok_decode(generated)
                    if any(stop in text for stop in until):
                        break
            for stop in until:
                text = text.split(stop)[0]
            outputs.append(text)
        return outputs


def run_lm_eval(model: str, tasks: str, *, include: str | None = None, limit: int | None = None,
                num_fewshot: int | None = None, device: str = "cpu", batch_size: int = 16, precision: str = "fp32",
                vocab_dir: str | None = None, log_samples: bool = False) -> dict:
    """lm-eval's ``simple_evaluate`` of our model on ``tasks`` (comma-separated lm-eval task names; ``include``:
    a folder of extra task YAMLs). Returns lm-eval's results (``results``, ``versions``, ``n-shot``, ``configs``
    and, with ``log_samples``, ``samples``)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    lm = GPT2ForgeLM(model, device=device, batch_size=batch_size, precision=precision, vocab_dir=vocab_dir)
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    manager = TaskManager(include_path=include) if include else TaskManager()
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit,
                                      task_manager=manager, log_samples=log_samples)
    except (KeyError, ValueError) as e:  # lm-eval's way of saying a task name is unknown
        raise UserError(f"--lm-eval {tasks}: {e}" + ("" if include else " (a local task? add --lm-eval-include DIR)")
                        ) from None
    return {k: v for k, v in out.items() if k in ("results", "versions", "n-shot", "configs", "samples",
                                                   "n-samples", "higher_is_better")}
