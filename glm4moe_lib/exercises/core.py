"""The machinery behind every "your turn" exercise: run a learner's function on several cases and
say in plain words what is wrong, recognizing the common mistakes.

A check is built from

* a reference implementation (the library's own),
* ``cases``: named argument tuples the function is called with,
* ``mistakes``: buggy variants of the reference, each with the sentence to say when the learner's
  output matches it (e.g. "you took the softmax over the tokens instead of the experts").

``check_function`` returns a :class:`CheckResult`, whose repr is the message, so a notebook cell
ending in ``check_router(my_router)`` shows the verdict.
"""

from __future__ import annotations

import copy
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

NOT_DONE = "not done yet"


@dataclass
class Case:
    """One call of the learner's function: ``fn(*args, **kwargs)``."""

    name: str
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)


@dataclass
class Mistake:
    """A known wrong implementation and what to tell a learner whose output matches it."""

    message: str
    fn: Callable[..., Any]


@dataclass
class CheckResult:
    """The verdict of a check: ``passed`` is True only when every case matched the reference."""

    title: str
    passed: bool
    message: str
    status: str = "failed"  # "passed", "failed" or "not done"

    def __repr__(self) -> str:
        return self.message

    def __bool__(self) -> bool:
        return self.passed


Compare = Callable[[Any, Any], "str | None"]


def describe(value: Any) -> str:
    """A short description of a value for error messages (shape and dtype for tensors)."""
    if isinstance(value, Tensor):
        return f"a tensor of shape {list(value.shape)} and dtype {value.dtype}"
    if isinstance(value, tuple):
        return "a tuple (" + ", ".join(describe(v) for v in value) + ")"
    try:
        text = repr(value)
    except Exception:  # a learner's object whose repr is broken
        text = "(no repr)"
    return f"{type(value).__name__} {text}"[:120]


def compare_values(got: Any, expected: Any, atol: float = 1e-5, rtol: float = 1e-4) -> str | None:
    """None if ``got`` equals ``expected`` (tensors: same shape, close values), else why not."""
    if isinstance(expected, tuple):
        if isinstance(got, list) and len(got) == len(expected):
            return f"it should return a tuple of {len(expected)} values (`return a, b`), not a list"
        if not isinstance(got, tuple) or len(got) != len(expected):
            return f"it should return a tuple of {len(expected)} values, but returned {describe(got)}"
        for i, (g, e) in enumerate(zip(got, expected)):
            why = compare_values(g, e, atol, rtol)
            if why:
                return f"in returned value #{i + 1}: {why}"
        return None
    if isinstance(expected, Tensor):
        if not isinstance(got, Tensor):
            return f"it should return {describe(expected)}, but returned {describe(got)}"
        if got.shape != expected.shape:
            return f"it returned shape {list(got.shape)}, but the expected shape is {list(expected.shape)}"
        if expected.is_floating_point() != got.is_floating_point():
            return f"it returned dtype {got.dtype}, but {expected.dtype} is expected"
        g, e = got.detach().cpu(), expected.detach().cpu()
        if not e.is_floating_point():
            if not torch.equal(g, e):
                return "its integer values differ from the expected ones"
            return None
        if not torch.allclose(g.double(), e.double(), atol=atol, rtol=rtol, equal_nan=True):
            why = _non_finite(g, e)
            if why:
                return why
            finite = g.isfinite() & e.isfinite()
            special = int((~finite & (g != e) & ~(g.isnan() & e.isnan())).sum())
            if special:
                where = "position" if special == 1 else "positions"
                return f"its values differ at {special} {where} where NaN or infinite values are expected"
            diff = (g.double() - e.double())[finite].abs().max().item()
            return f"its values differ from the expected ones (largest difference {diff:.3g})"
        return None
    if isinstance(expected, float):
        number, why = as_number(got)
        if why:
            return why
        ok = abs(float(number) - expected) <= atol + rtol * abs(expected)
        return None if ok else f"it returned {float(number):.6g}, but {expected:.6g} is expected"
    if isinstance(expected, numbers.Real) and not isinstance(expected, bool):
        number, why = as_number(got)
        if why:
            return why
        return None if number == expected else f"it returned {number!r}, but {expected!r} is expected"
    try:
        same = bool(got == expected)
    except Exception:  # e.g. an array compared element by element
        same = False
    return None if same else f"it returned {describe(got)}, but {expected!r} is expected"


def _non_finite(got: Tensor, expected: Tensor) -> str | None:
    """Plain words for NaN (or inf) in ``got`` where ``expected`` is finite, else None."""
    nan = int((got.isnan() & ~expected.isnan()).sum())
    if nan:
        return (
            f"your output contains NaN (not a number) at {nan} of {got.numel()} positions where the expected "
            "values are numbers (a 0/0, or the log of 0?)"
        )
    inf = int((got.isinf() & expected.isfinite()).sum())
    if inf:
        return (
            f"your output contains inf at {inf} of {got.numel()} positions where the expected values are "
            "finite (a division by 0, or an overflow?)"
        )
    return None


def as_number(got: Any) -> tuple[Any, str | None]:
    """``(number, None)`` when ``got`` is one real number (a Python or NumPy number, or a tensor or array
    holding a single value), else ``(None, why not)`` in plain words."""
    if isinstance(got, str):
        return None, f"it returned the string {got!r}, but a number is expected: return the number, not text"
    if isinstance(got, (Tensor, numbers.Number)) or (hasattr(got, "shape") and hasattr(got, "item")):
        size = got.numel() if isinstance(got, Tensor) else int(getattr(got, "size", 1))
        if size != 1:
            return None, (
                f"it returned {describe(got)} ({size} values), but one number is expected: return a "
                "single value, e.g. a Python number (.item() of a one-element tensor gives it)"
            )
        if not isinstance(got, numbers.Number):
            got = got.item()
    if isinstance(got, (bool, complex)) or not isinstance(got, numbers.Real):
        return None, f"it should return a number, but returned {describe(got)}"
    return got, None


def check_function(
    title: str,
    learner_fn: Callable[..., Any],
    reference_fn: Callable[..., Any],
    cases: Sequence[Case],
    mistakes: Sequence[Mistake] = (),
    compare: Compare = compare_values,
) -> CheckResult:
    """Run ``learner_fn`` on every case, compare with ``reference_fn``, explain the first failure."""
    if not callable(learner_fn):
        return CheckResult(title, False, f"❌ {title}: expected a function, got {describe(learner_fn)}")
    for case in cases:
        expected = reference_fn(*case.args, **case.kwargs)
        try:
            got = learner_fn(*_clone(case.args), **_clone(case.kwargs))
        except NotImplementedError:
            msg = f"⏳ {title}: {NOT_DONE}. Replace the `raise NotImplementedError` with your code and run the check again."
            return CheckResult(title, False, msg, status="not done")
        except Exception as exc:  # the learner's bug, reported in words
            msg = f"❌ {title}: on the case '{case.name}' your function raised {type(exc).__name__}: {exc}"
            return CheckResult(title, False, msg)
        if got is None or got is Ellipsis:
            msg = f"⏳ {title}: {NOT_DONE} (your function returned {got!r}; did you forget `return`?)"
            return CheckResult(title, False, msg, status="not done")
        why = _safe_compare(compare, got, expected)
        if why is None:
            continue
        for mistake in mistakes:
            try:
                wrong = mistake.fn(*_clone(case.args), **_clone(case.kwargs))
            except Exception:
                continue
            if _safe_compare(compare, got, wrong) is None:
                msg = f"❌ {title}: on the case '{case.name}' {mistake.message}"
                return CheckResult(title, False, msg)
        return CheckResult(title, False, f"❌ {title}: on the case '{case.name}' {why}.")
    msg = f"✅ {title}: correct on all {len(cases)} cases."
    return CheckResult(title, True, msg, status="passed")


def _safe_compare(compare: Compare, got: Any, expected: Any) -> str | None:
    """``compare(got, expected)``, with a plain-words verdict instead of a crash on an odd return value."""
    try:
        return compare(got, expected)
    except Exception:
        return f"it returned {describe(got)}, but {describe(expected)} is expected"


#: values handed to a learner's function as they are: nothing in them can be changed in place
_IMMUTABLE = (numbers.Number, str, bytes, type(None), torch.dtype, torch.device)


def _clone(obj: Any) -> Any:
    """Copies of the arguments, so a learner function that edits its inputs in place can neither fool
    a check nor change shared objects for the rest of the session (a preset's config, a layer)."""
    if isinstance(obj, Tensor):
        return obj.clone()
    if isinstance(obj, tuple):
        items = [_clone(o) for o in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)  # keep NamedTuples
    if isinstance(obj, list):
        return [_clone(o) for o in obj]
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, _IMMUTABLE) or callable(obj) and not isinstance(obj, torch.nn.Module):
        return obj
    try:  # a config (dataclass), a layer (nn.Module), ...: the learner gets its own copy
        return copy.deepcopy(obj)
    except Exception:  # an object that cannot be copied: hand over the original
        return obj
