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
