import torch

from recast.bank import TemplateBank, compose, fingerprint


def test_compose_is_the_paper_formula():
    torch.manual_seed(0)
    templates = torch.randn(3, 4, 5)  # n=3
    coefficients = torch.randn(2, 3)  # K=2
    expected = sum(coefficients[k, i] * templates[i] for k in range(2) for i in range(3)) / 2
    torch.testing.assert_close(compose(templates, coefficients), expected)


def test_compose_batched_matches_single():
    templates = torch.randn(2, 6, 3)
    coefficients = torch.randn(4, 2, 2)  # four modules
    batched = compose(templates, coefficients)
    assert batched.shape == (4, 6, 3)
    for i in range(4):
        torch.testing.assert_close(batched[i], compose(templates, coefficients[i]))


def test_fingerprint_changes_with_any_template_value():
    bank = TemplateBank(torch.randn(2, 3, 3))
    before = fingerprint([("b", bank.templates)])
    assert before == fingerprint([("b", bank.templates.clone())])
    with torch.no_grad():
        bank.templates[1, 2, 2] += 1e-6
    assert fingerprint([("b", bank.templates)]) != before
