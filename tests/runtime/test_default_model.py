"""The model bundled with the package loads and answers held-out arithmetic (pairs never trained on)."""
import os

from dslocal.runtime import data
from dslocal.runtime.load import RunConfig, default_model, load
from dslocal.runtime.sampling import Sampling


def test_bundled_model_answers_held_out_additions():
    path = default_model()
    assert os.path.getsize(path) < 25e6
    loaded = load(path, RunConfig(context=256))
    greedy = Sampling(temperature=0.0, max_tokens=16)
    questions = [q for q in data.held_out_questions(40) if q[0] == "addition"][:12]
    wrong = []
    for _, question, answer in questions:
        ids = loaded.template.encode(loaded.engine.tokenizer, [{"role": "user", "content": question}])
        text = "".join(p.text for p in loaded.engine.generate(ids, greedy))
        a, b = (int(x) for x in question.removeprefix("What is ").rstrip("?").split(" + "))
        assert data.is_held_out(a, b)
        if text.strip() != f"{a} + {b} = {answer}.":
            wrong.append((question, text))
    assert not wrong, wrong
