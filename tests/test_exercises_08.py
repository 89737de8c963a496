"""The lesson 08 checks: each common mistake gets its plain-words message."""

import torch

from glm4moe_lib.exercises import check_specialization_matrix


def _counts(topk_indices, domain_ids, n_domains, n_experts):
    out = torch.zeros(n_domains, n_experts)  # [D, E]
    out.index_put_(
        (domain_ids[:, None].expand_as(topk_indices), topk_indices), torch.tensor(1.0), accumulate=True
    )
    return out


def spec_ok(topk_indices, domain_ids, n_domains, n_experts):
    c = _counts(topk_indices, domain_ids, n_domains, n_experts)
    return c / c.sum(1, keepdim=True).clamp_min(1)


def spec_no_clamp(topk_indices, domain_ids, n_domains, n_experts):
    c = _counts(topk_indices, domain_ids, n_domains, n_experts)
    return c / c.sum(1, keepdim=True)  # a domain with no tokens: 0/0 = NaN


def test_specialization_matrix_correct():
    result = check_specialization_matrix(spec_ok)
    assert result.passed, result.message


def test_specialization_matrix_without_clamp_names_the_empty_domain():
    result = check_specialization_matrix(spec_no_clamp)
    assert not result.passed
    assert "a domain with no tokens" in result.message and ".clamp_min(1)" in result.message, result.message


def test_dividing_by_tokens_and_by_columns_get_their_own_messages():
    from glm4moe_lib.exercises.lesson_08 import _counts

    def per_token(idx, dom, d, e):
        return _counts(idx, dom, d, e) / torch.bincount(dom, minlength=d).float()[:, None].clamp_min(1)

    def per_expert(idx, dom, d, e):
        c = _counts(idx, dom, d, e)
        return c / c.sum(0, keepdim=True).clamp_min(1)

    assert "rows sum to K" in check_specialization_matrix(per_token).message
    assert "normalized each expert's column" in check_specialization_matrix(per_expert).message


def test_dispatch_bytes_diagnoses_dispatch_plus_combine_and_the_local_rows_apart():
    from glm4moe_lib.exercises import check_dispatch_bytes
    from glm4moe_lib.parallel import a2a_bytes_formula

    both = check_dispatch_bytes(lambda t, k, h, w, b: 2 * a2a_bytes_formula(t, k, h, w, b))
    local = check_dispatch_bytes(lambda t, k, h, w, b: float(t * k * h * b))
    assert "dispatch + combine" in both.message and "stay on the rank" in local.message


def test_glm4_router_refuses_zero_masking_of_dropped_groups():
    from glm4moe_lib.exercises import check_glm4_router
    from glm4moe_lib.exercises.lessons_05_07 import _route_variant

    r = check_glm4_router(lambda *a: _route_variant(*a, mask_value=0.0))
    assert not r.passed and "float('-inf')" in r.message
    assert check_glm4_router(lambda *a: _route_variant(*a)).passed
