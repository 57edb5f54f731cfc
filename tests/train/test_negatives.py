"""Hard negative captions: the rewrite rules, their determinism, and their place in both losses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from train.data.negatives import hard_negative, own_words_end, replacements
from train.losses import sigmoid_loss, softmax_loss

CAPTION = (
    "Three shapes are arranged on a plain pale green background. In the top left there is a small red "
    "circle with a dotted fill. A large blue square sits in the bottom right."
)


def _words(text: str) -> list[str]:
    return text.replace(".", " ").split()


def test_a_negative_changes_attribute_words_only() -> None:
    seen = set()
    for epoch in range(40):
        neg = hard_negative(CAPTION, "key", epoch)
        assert neg is not None and neg != CAPTION
        a, b = _words(CAPTION), _words(neg)
        assert len(a) == len(b)
        changed = [(x, y) for x, y in zip(a, b, strict=True) if x != y]
        assert 1 <= len(changed) <= 2, changed  # one word replaced, or two swapped
        if len(changed) == 2:  # a swap exchanges two words of the caption
            assert changed[0] == changed[1][::-1]
        seen.update(x.lower().strip(",") for x, _ in changed)
    # several classes get rewritten over epochs, never the template words
    assert (
        {"red", "blue"} & seen and {"circle", "square"} & seen and {"top", "left", "bottom", "right"} & seen
    )
    assert not seen & {"shapes", "arranged", "background", "fill", "sits"}


def test_negatives_are_a_function_of_seed_key_and_epoch() -> None:
    assert hard_negative(CAPTION, "a", 3) == hard_negative(CAPTION, "a", 3)
    drawn = {hard_negative(CAPTION, k, e, seed=s) for k in "ab" for e in range(3) for s in range(2)}
    assert len(drawn) > 3
    assert hard_negative("geometric pattern wallpaper", "a", 0) is None
    assert hard_negative("Red circle", "a", 0)[0].isupper()  # capitalisation kept


def test_custom_word_classes(tmp_path) -> None:
    words = tmp_path / "words.yaml"
    words.write_text("fruit: [apple, pear]\n")
    assert hard_negative("an apple on a red table", "k", 0, words_file=str(words)) == "an pear on a red table"


def test_region_replacements_are_every_other_word_of_the_class() -> None:
    """Stage 2's region hard negatives: the caption's shape word replaced by each other shape, the
    rest of the caption (and the word's plural and capitals) unchanged."""
    from train.data.negatives import DEFAULT_CLASSES

    shapes = DEFAULT_CLASSES["shape"].split()
    got = replacements("a medium pink striped square in the top left", ["shape"])
    assert got == [f"a medium pink striped {s} in the top left" for s in shapes if s != "square"]
    assert replacements("Two Crosses", ["shape"])[0] == "Two Circles"
    both = replacements("a red circle", ["shape", "colour"])
    assert len(both) == len(shapes) - 1 + len(DEFAULT_CLASSES["colour"].split()) - 1
    assert replacements("the word SALE in black letters", ["shape"]) == []
    with pytest.raises(ValueError, match="fruit"):
        replacements("a red circle", ["fruit"])


@pytest.mark.parametrize(
    ("caption", "swapped"),
    [
        ('the word "SOUP" in black letters below the yellow triangle in the top right', None),
        ("a red square to the left of the blue circle", "square"),
        ("a small star beside a large ring", "star"),
        ("a large red solid star in the bottom left", "star"),  # "in the bottom left": a place
    ],
)
def test_region_hard_negatives_change_the_regions_own_words_not_a_neighbours(caption, swapped) -> None:
    """A word after a spatial relation describes another object: a negative that changes it
    would teach the region that object's attribute (the word boxes learnt their neighbours'
    shapes). Only the region's own words are replaced."""
    if swapped is None:  # the letters' own colour ("black") may change, the neighbour's shape not
        assert replacements(caption, ["shape"]) == []
        assert all("triangle" in neg and "yellow" in neg for neg in replacements(caption, ["colour"]))
        return
    got = replacements(caption, ["shape", "colour"])
    changed = {a for neg in got for a, b in zip(caption.split(), neg.split(), strict=True) if a != b}
    assert swapped in changed and changed <= set(caption[: own_words_end(caption)].split()), changed


def test_region_hard_negative_loss_is_each_regions_softmax_over_its_own_texts() -> None:
    """``RegionAligner.hard_negative_loss`` against a per-region cross-entropy written out."""
    from train.config import ModelConfig, TextConfig, VisionConfig
    from train.model.region_align import RegionAligner, region_embeddings
    from train.model.towers import TextTower, VisionTower

    torch.manual_seed(0)
    cfg = ModelConfig(
        vision=VisionConfig(width=32, depth=1, heads=2, patch_size=8),
        text=TextConfig(width=32, depth=1, heads=2, context=16, vocab_size=50),
        embed_dim=16,
    )
    vision, aligner = VisionTower(cfg), RegionAligner(TextTower(cfg, 50), 2.0)
    grids = [torch.randn(4, 4, 32), torch.randn(3, 5, 32)]
    boxes = torch.tensor([[0, 0.0, 0.0, 0.5, 0.5], [0, 0.5, 0.5, 1.0, 1.0], [1, 0.1, 0.2, 0.9, 0.8]])
    owner = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])  # region 0: caption + 2 negatives, ...
    tokens = torch.randint(1, 50, (9, 6))
    mask = torch.ones(9, 6, dtype=torch.bool)
    img = region_embeddings(vision, grids, boxes)
    got = aligner.hard_negative_loss(img, tokens, mask, owner)
    txt = F.normalize(aligner.text(tokens, mask).float(), dim=-1)
    want = torch.stack(
        [
            F.cross_entropy((2.0 * torch.ones(1)).exp() * img[r] @ txt[owner == r].T, torch.tensor(0))
            for r in range(3)
        ]
    ).mean()
    torch.testing.assert_close(got, want)


def _feats(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, 8, generator=g, dtype=torch.float64), dim=-1)


def test_softmax_puts_negatives_beside_the_batch_texts() -> None:
    img, txt, neg = _feats(4, 0), _feats(4, 1), _feats(4, 2)
    scale = torch.tensor(1.5, dtype=torch.float64)
    valid, neg_valid = torch.ones(4, dtype=torch.bool), torch.tensor([1, 0, 1, 1], dtype=torch.bool)
    s = scale.exp()
    cand = torch.cat([img @ txt.T, (img @ neg.T).masked_fill(~neg_valid[None], float("-inf"))], 1) * s
    target = torch.arange(4)
    expected = (F.cross_entropy(cand, target) + F.cross_entropy(txt @ img.T * s, target)) / 2
    _, value = softmax_loss(img, txt, valid, scale, neg_BE=neg, neg_valid_B=neg_valid)
    torch.testing.assert_close(value, expected)
    # a negative equal to its positive caption makes image->text ambiguous: the loss must rise
    _, plain = softmax_loss(img, txt, valid, scale)
    _, tied = softmax_loss(img, txt, valid, scale, neg_BE=txt.clone(), neg_valid_B=valid)
    assert tied > plain


def test_sigmoid_counts_negatives_as_one_more_negative_block() -> None:
    img, txt, neg = _feats(3, 0), _feats(3, 1), _feats(3, 2)
    scale, bias = torch.tensor(1.0, dtype=torch.float64), torch.tensor(-2.0, dtype=torch.float64)
    neg_valid = torch.tensor([1, 1, 0], dtype=torch.bool)
    _, plain = sigmoid_loss(img, txt, torch.ones(3, dtype=torch.bool), scale, bias)
    _, value = sigmoid_loss(
        img, txt, torch.ones(3, dtype=torch.bool), scale, bias, neg_BE=neg, neg_valid_B=neg_valid
    )
    extra = -F.logsigmoid(-(img @ neg[:2].T * scale.exp() + bias)).sum() / 3
    torch.testing.assert_close(value, plain + extra)
