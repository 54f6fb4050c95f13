"""A label set's prompts tokenized from their parts equal the prompts tokenized whole, token for token."""

from __future__ import annotations

import open_clip
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.clip.templates import TEMPLATE_SETS, render
from server.clip.tokens import composable, tokenize_prompts

TOKENIZER = open_clip.get_tokenizer("ViT-B-32")
CHECK = settings(max_examples=500, deadline=None, derandomize=True)

# Few pieces, each a kind of join: letters, a digit, a space, punctuation (that joins with punctuation), the
# characters that join otherwise (an HTML entity's "&" and "amp;", a contraction's apostrophe and "s", the
# "<" of a special token), a non-ASCII letter. Few pieces make every kind of join frequent.
pieces = st.sampled_from(["a", "s", "1", " ", ".", "-", "&", "amp;", "'", "<", "end_of_text>", "é"])
texts = st.lists(pieces, max_size=6).map("".join)
templates_ = st.tuples(texts, texts).map("{}".join) | texts  # mostly one placeholder, sometimes none or several


def whole(labels: list[str], templates: list[str]) -> list[list[int]]:
    return TOKENIZER([render(t, label) for label in labels for t in templates]).tolist()


def test_clips_tokenizer_is_composable():
    assert composable(TOKENIZER)


@CHECK
@given(st.lists(texts.filter(str.strip), min_size=1, max_size=4), st.lists(templates_, min_size=1, max_size=4))
def test_composed_tokens_equal_whole_prompts(labels, templates):
    composed = tokenize_prompts(TOKENIZER, labels, templates, TOKENIZER.context_length)
    assert composed.tolist() == whole(labels, templates)


@pytest.mark.parametrize("name", sorted(TEMPLATE_SETS))
def test_the_built_in_template_sets_compose(name):
    labels = ["cat", "golden retriever", "t-shirt", "St. Bernard", "7-eleven", "a&w root beer", "o'brien"]
    labels += [" ".join(["cat"] * k) for k in range(60, 80)]  # around the 77-token context, past it too
    templates = list(TEMPLATE_SETS[name])
    composed = tokenize_prompts(TOKENIZER, labels, templates, TOKENIZER.context_length)
    assert composed.tolist() == whole(labels, templates)  # the long labels: cut to the context, EOT last
