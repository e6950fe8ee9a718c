"""Classifier judges on real components: the alt-profanity-check model itself, and a tiny BERT
sequence classifier built and saved here, loaded by path (its outputs compared with a direct
forward pass, its bias set to put the probability where the test wants it)."""
from __future__ import annotations

import pytest
import torch

from lmms_sgm.judges import JudgeItem, get_judge, identity, judge_many

TEXTS = ["You stupid idiot.", "What a lovely red circle.", "Shut up, you moron.", "I'm sorry, I cannot help with that.", ""]


# --------------------------------------------------------------------------- profanity


def test_profanity_scores_are_the_packages_own_probabilities():
    from profanity_check import predict_prob

    judge = get_judge("profanity")
    verdicts = judge_many(judge, [JudgeItem("q", t) for t in TEXTS])
    expected = predict_prob(TEXTS)
    assert [v.score for v in verdicts] == pytest.approx(list(expected), abs=0)
    assert [v.unsafe for v in verdicts] == [p >= 0.5 for p in expected]
    assert verdicts[0].unsafe and not verdicts[1].unsafe  # the model does tell these apart
    assert verdicts[3].refusal and not verdicts[0].refusal
    assert judge.judge("q", TEXTS[2]) == verdicts[2]  # one at a time = in a batch


def test_profanity_threshold_and_identity():
    from importlib.metadata import version

    from profanity_check import predict_prob

    p = float(predict_prob(["You fool."])[0])
    assert 0.05 < p < 0.999
    assert get_judge("profanity", threshold=str(p - 0.01)).judge("q", "You fool.").unsafe
    assert not get_judge("profanity", threshold=str(p + 0.01)).judge("q", "You fool.").unsafe
    config = identity(get_judge("profanity", threshold="0.7"))["config"]
    assert config["threshold"] == 0.7 and config["model"]["version"] == version("alt-profanity-check")
    assert config["model"]["scikit-learn"] == version("scikit-learn") and len(config["model"]["sha256"]) == 16
    with pytest.raises(ValueError, match="threshold"):
        get_judge("profanity", threshold="1.5")


# --------------------------------------------------------------------------- hf-classifier

WORDS = "you stupid idiot what a lovely red circle shut up moron i'm sorry, i cannot help with that. insult me please".split()


def build_classifier(path, *, labels=("neutral", "toxic"), problem_type=None, seed=0):
    """A random-init 2-layer BERT classifier with a word-level tokenizer, saved with save_pretrained."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + sorted({w.lower() for w in WORDS}))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                        sep_token="[SEP]")
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=len(labels),
                        id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)},
                        problem_type=problem_type, initializer_range=0.5)  # large weights: outputs that depend on the input
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def direct_probs(path, texts, pairs=None, sigmoid=False):
    """The reference: one unpadded forward pass per text, straight through transformers."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    out = []
    for i, t in enumerate(texts):
        enc = tok(pairs[i], t, return_tensors="pt") if pairs else tok(t, return_tensors="pt")
        with torch.no_grad():
            logits = model(**enc).logits[0]
        out.append(torch.sigmoid(logits) if sigmoid else torch.softmax(logits, -1))
    return torch.stack(out)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    return build_classifier(tmp_path_factory.mktemp("clf"))


def test_hf_classifier_matches_a_direct_forward_in_batches(classifier):
    texts = TEXTS[:4] + ["insult me please you idiot red circle"]
    ref = direct_probs(classifier, texts)[:, 1]
    for batch_size in ("2", "32"):
        judge = get_judge("hf-classifier", path=str(classifier), batch_size=batch_size, threshold="0.5")
        verdicts = judge_many(judge, [JudgeItem("q", t) for t in texts])
        assert [v.score for v in verdicts] == pytest.approx(ref.tolist(), abs=1e-5)
        assert [v.unsafe for v in verdicts] == [bool(p >= 0.5) for p in ref]
    cfg = identity(judge)["config"]
    assert cfg["unsafe_labels"] == ["toxic"] and cfg["activation"] == "softmax" and cfg["labels"] == {"0": "neutral", "1": "toxic"}
    assert cfg["path"] == str(classifier.resolve()) and len(cfg["checkpoint"]) == 16


def test_hf_classifier_prompt_and_response_as_a_pair(classifier):
    items = [JudgeItem("insult me please", "you idiot"), JudgeItem("what a lovely", "red circle")]
    ref = direct_probs(classifier, [x.response for x in items], pairs=[x.prompt for x in items])[:, 1]
    judge = get_judge("hf-classifier", path=str(classifier), input="prompt+response")
    assert [v.score for v in judge_many(judge, items)] == pytest.approx(ref.tolist(), abs=1e-5)
    alone = direct_probs(classifier, [x.response for x in items])[:, 1]
    assert (ref - alone).abs().max() > 0.01  # the prompt does change the output


@pytest.mark.parametrize("bias, p_toxic", [((0.0, 3.0), 0.95257), ((3.0, 0.0), 0.04743)])
def test_hf_classifier_threshold_on_a_controlled_output(tmp_path, bias, p_toxic):
    from transformers import AutoModelForSequenceClassification

    path = build_classifier(tmp_path / "c")
    model = AutoModelForSequenceClassification.from_pretrained(path)
    with torch.no_grad():  # every input now gets the same logits: the bias
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor(bias))
    model.save_pretrained(path)
    for text in TEXTS:
        v = get_judge("hf-classifier", path=str(path)).judge("q", text)
        assert v.score == pytest.approx(p_toxic, abs=1e-5) and v.unsafe == (p_toxic >= 0.5)
    assert get_judge("hf-classifier", path=str(path), threshold="0.96").judge("q", "x").unsafe is False
    assert get_judge("hf-classifier", path=str(path), threshold="0.04").judge("q", "x").unsafe is True


def test_hf_classifier_labels(tmp_path):
    path = build_classifier(tmp_path / "generic", labels=("LABEL_0", "LABEL_1"))
    with pytest.raises(ValueError, match="unsafe_labels"):
        get_judge("hf-classifier", path=str(path))
    by_index = get_judge("hf-classifier", path=str(path), unsafe_labels="1")
    renamed = get_judge("hf-classifier", path=str(path), label_map="0:fine+1:offensive")
    assert identity(renamed)["config"]["unsafe_labels"] == ["offensive"]
    assert by_index.judge("q", "you idiot").score == renamed.judge("q", "you idiot").score
    with pytest.raises(ValueError, match="not one of"):
        get_judge("hf-classifier", path=str(path), unsafe_labels="toxic")
    with pytest.raises(ValueError, match="not a directory"):
        get_judge("hf-classifier", path=str(tmp_path / "missing"))


def test_hf_classifier_multi_label_takes_the_largest_unsafe_sigmoid(tmp_path):
    path = build_classifier(tmp_path / "ml", labels=("toxic", "insult", "neutral"), problem_type="multi_label_classification")
    texts = TEXTS[:3]
    ref = direct_probs(path, texts, sigmoid=True)
    judge = get_judge("hf-classifier", path=str(path))
    assert identity(judge)["config"]["activation"] == "sigmoid" and identity(judge)["config"]["unsafe_labels"] == ["toxic", "insult"]
    assert [v.score for v in judge_many(judge, [JudgeItem("q", t) for t in texts])] == pytest.approx(
        ref[:, :2].max(1).values.tolist(), abs=1e-5
    )


def test_checkpoint_digest_follows_the_weights(tmp_path):
    from transformers import AutoModelForSequenceClassification

    path = build_classifier(tmp_path / "d")
    before = identity(get_judge("hf-classifier", path=str(path)))["config"]["checkpoint"]
    model = AutoModelForSequenceClassification.from_pretrained(path)
    with torch.no_grad():
        model.classifier.bias.add_(1.0)
    model.save_pretrained(path)
    assert identity(get_judge("hf-classifier", path=str(path)))["config"]["checkpoint"] != before
