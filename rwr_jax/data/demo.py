"""A small SYNTHETIC medical-style multiple-choice set with images and a knowledge base.

    paths = generate_demo_data("/tmp/rwr_demo", num_train=256, num_eval=64, seed=0)
    paths.train, paths.eval, paths.corpus, paths.images_dir

Everything here is made up, deterministically, from a seed and without network
access: the conditions, findings and drugs do not exist, and nothing in it is medical
knowledge. It exists so that the demo preset and the tests can run the whole pipeline
(records -> prompts -> rollout with retrieval -> rewards) on CPU in minutes, on data
where retrieval actually helps:

- N fictional conditions ("Varnel syndrome"), each with a distinctive imaging finding
  ("three red rings") and a first-line treatment ("oral keltrazine");
- `corpus.jsonl` (`{"id", "title", "text"}`, the document store's jsonl format) holds,
  per condition, one passage stating its finding, one stating its treatment and one
  distractor passage; the facts appear nowhere else, so a model can only know them by
  retrieving;
- text-only questions (stage 1, `multimodal=False`) ask for a condition's treatment or
  finding, or the condition behind a finding; multimodal questions (stage 2) show a PNG
  (56 to 112 pixels a side) drawing the finding (shape, colour and count of marks) and
  ask for the condition shown or its treatment (two retrieval hops: finding ->
  condition -> treatment);
- `cases.jsonl` (multimodal only; `retrieval.image_index`'s case-corpus format: `id`,
  `image`, `caption`) holds one solved case per training image, its caption naming the
  finding, the condition and its treatment: the similar-case corpus of CDIR
  (`eval.cdir`);
- rows follow the Med-RwR schema (`rwr_jax.data.records`): 4 options A-D in the
  question and in `options`, `answer` "B. text", a `difficulty` per question kind, and
  the extra fields `condition` and `kind` (ignored by the parser, used by tests).

Files written under `out_dir`: `train.jsonl`, `eval.jsonl`, `corpus.jsonl`,
`images/{train,eval}-NNNNN.png` and `cases.jsonl` (multimodal only), `README.md`.
Re-running with the same arguments rewrites identical bytes (files whose bytes are
unchanged are not touched); demo images of an earlier, larger run, and the cases of
an earlier multimodal run, are removed.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re

from absl import logging
import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("rings", "stripes", "dots", "squares", "crosses")
COLORS = {"red": (220, 50, 50), "green": (50, 180, 70), "blue": (60, 100, 230), "yellow": (235, 205, 40)}
COUNTS = {2: "two", 3: "three", 4: "four", 5: "five"}
SIDES = (56, 84, 112)
_SYLLABLES = ("var", "nel", "tho", "mir", "kas", "len", "dor", "pra", "zel", "quo", "bri", "fen", "lum",
              "sar", "tev", "olo", "gan", "rix", "pel", "dum")
_DISEASE_SUFFIXES = ("syndrome", "disease", "fever", "dystrophy", "sclerosis")
_DRUG_SUFFIXES = ("azine", "umab", "ostat", "cillin", "oxide", "tropin")
_ROUTES = ("oral", "intravenous", "topical", "inhaled")
_TEXT_KINDS = {"treatment": 0.3, "finding": 0.5, "condition_from_finding": 0.6}
_IMAGE_KINDS = {"image_condition": 0.6, "image_treatment": 0.9}
_IMAGE_NAME = re.compile(r"^(train|eval)-\d{5}\.png$")


@dataclasses.dataclass(frozen=True)
class Condition:
    """A fictional condition: its name, imaging finding (shape, colour, count) and treatment."""

    id: str
    name: str
    shape: str
    color: str
    count: int
    treatment: str

    @property
    def finding(self) -> str:
        return f"{COUNTS[self.count]} {self.color} {self.shape}"


@dataclasses.dataclass(frozen=True)
class DemoPaths:
    """Where `generate_demo_data` wrote the set (absolute paths)."""

    root: str
    train: str
    eval: str
    corpus: str
    images_dir: str
    readme: str
    cases: str  # written for multimodal sets only


def generate_demo_data(out_dir: str | os.PathLike[str], num_train: int = 256, num_eval: int = 64, seed: int = 0,
                       multimodal: bool = True, num_conditions: int = 24) -> DemoPaths:
    """Writes the synthetic demo set (see the module docstring) into `out_dir`.

    Args:
        out_dir: target directory (created if needed).
        num_train: training questions.
        num_eval: evaluation questions (the same conditions, new questions and images).
        seed: all content derives from it.
        multimodal: one image per question (stage 2); False writes text-only questions (stage 1).
        num_conditions: fictional conditions, 4 to 80.

    Returns:
        The written paths.
    """
    if not 4 <= num_conditions <= len(SHAPES) * len(COLORS) * len(COUNTS):
        raise ValueError(f"num_conditions must be in 4..{len(SHAPES) * len(COLORS) * len(COUNTS)}, "
                         f"got {num_conditions}")
    for name, value in (("num_train", num_train), ("num_eval", num_eval)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    root = os.path.abspath(os.fspath(out_dir))
    paths = DemoPaths(root=root, train=os.path.join(root, "train.jsonl"), eval=os.path.join(root, "eval.jsonl"),
                      corpus=os.path.join(root, "corpus.jsonl"), images_dir=os.path.join(root, "images"),
                      readme=os.path.join(root, "README.md"), cases=os.path.join(root, "cases.jsonl"))
    os.makedirs(paths.images_dir, exist_ok=True)
    conditions = make_conditions(num_conditions, seed)
    _write_jsonl(paths.corpus, corpus_passages(conditions, seed))
    images = set()
    for split, count, path in (("train", num_train, paths.train), ("eval", num_eval, paths.eval)):
        rows, split_images = _make_split(split, count, conditions, seed, multimodal)
        for name, png in split_images.items():
            _write_if_changed(os.path.join(paths.images_dir, name), png)
        images.update(split_images)
        _write_jsonl(path, rows)
        if multimodal and split == "train":
            _write_jsonl(paths.cases, demo_cases(rows, conditions))
    if not multimodal and os.path.isfile(paths.cases):
        os.remove(paths.cases)
    for name in os.listdir(paths.images_dir):
        if _IMAGE_NAME.match(name) and name not in images:
            os.remove(os.path.join(paths.images_dir, name))
    _write_if_changed(paths.readme, _readme(num_train, num_eval, seed, multimodal, num_conditions).encode())
    logging.info("Demo data (synthetic): %d train, %d eval questions, %d conditions in %s",
                 num_train, num_eval, num_conditions, root)
    return paths


def make_conditions(num_conditions: int, seed: int) -> list[Condition]:
    """The fictional conditions: unique names, findings and treatments."""
    rng = np.random.default_rng([seed, 7])
    findings = [(s, c, n) for s in SHAPES for c in COLORS for n in COUNTS]
    order = rng.permutation(len(findings))[:num_conditions]
    names, drugs, conditions = set(), set(), []
    for index, finding in enumerate(order):
        name = _unique(names, lambda: _word(rng, 2).capitalize() + " " + str(rng.choice(_DISEASE_SUFFIXES)))
        drug = _unique(drugs, lambda: f"{rng.choice(_ROUTES)} {_word(rng, 2)}{rng.choice(_DRUG_SUFFIXES)}")
        shape, color, count = findings[finding]
        conditions.append(Condition(id=f"cond{index:03d}", name=name, shape=shape, color=color, count=count,
                                    treatment=drug))
    return conditions


def corpus_passages(conditions: list[Condition], seed: int) -> list[dict]:
    """Three passages per condition: finding, treatment and a distractor (no facts)."""
    rng = np.random.default_rng([seed, 11])
    passages = []
    for c in conditions:
        low = int(rng.integers(18, 60))
        passages += [
            {"id": f"{c.id}-finding", "title": c.name,
             "text": f"{c.name} is a rare disorder. On imaging, {c.name} characteristically shows {c.finding}, "
                     f"a pattern that distinguishes it from every other condition."},
            {"id": f"{c.id}-treatment", "title": c.name,
             "text": f"The first-line treatment of {c.name} is {c.treatment}. Most patients with {c.name} "
                     f"improve within weeks of starting it."},
            {"id": f"{c.id}-epidemiology", "title": c.name,
             "text": f"{c.name} most often presents in adults aged {low} to {low + 20} and is diagnosed by "
                     f"a specialist after imaging."},
        ]
    return passages


def demo_cases(rows: list[dict], conditions: list[Condition]) -> list[dict]:
    """CDIR's case corpus: per multimodal row, its image and a caption solving the case."""
    by_id = {c.id: c for c in conditions}
    cases = []
    for row in rows:
        c = by_id[row["condition"]]
        cases.append({"id": f"case-{row['id']}", "image": row["images"][0],
                      "caption": f"Imaging shows {c.finding}. Diagnosis: {c.name}. First-line treatment: "
                                 f"{c.treatment}."})
    return cases


def _make_split(split, count, conditions, seed, multimodal) -> tuple[list[dict], dict[str, bytes]]:
    rng = np.random.default_rng([seed, 1 if split == "train" else 2])
    kinds = _IMAGE_KINDS if multimodal else _TEXT_KINDS
    rows, images = [], {}
    for index in range(count):
        condition = conditions[int(rng.integers(len(conditions)))]
        kind = str(rng.choice(list(kinds)))
        stem, correct, pool = _question(kind, condition, conditions, rng)
        options, letter = _options(correct, pool, rng)
        question = stem + "\n" + "\n".join(f"{key}. {text}" for key, text in options.items())
        row = {"id": f"demo-{split}-{index:05d}", "question": question, "images": [],
               "answer": f"{letter}. {correct}", "options": options, "difficulty": kinds[kind],
               "condition": condition.id, "kind": kind}
        if multimodal:
            name = f"{split}-{index:05d}.png"
            images[name] = draw_finding(condition, rng)
            row["images"] = [f"images/{name}"]
        rows.append(row)
    return rows, images


def _question(kind, condition, conditions, rng) -> tuple[str, str, list[str]]:
    """(stem, correct option text, distractor pool) of one question."""
    age = int(rng.integers(18, 85))
    patient = f"{'an' if age in (18, 80, 81, 82, 83, 84) else 'a'} {age}-year-old {rng.choice(['woman', 'man'])}"
    others = [c for c in conditions if c is not condition]
    if kind == "treatment":
        return (f"{patient.capitalize()} is diagnosed with {condition.name}. Which is the first-line treatment?",
                condition.treatment, [c.treatment for c in others])
    if kind == "finding":
        return (f"{patient.capitalize()} has suspected {condition.name}. Which imaging finding is characteristic "
                f"of this condition?", condition.finding, [c.finding for c in others])
    if kind == "condition_from_finding":
        return (f"Imaging of {patient} shows {condition.finding}. Which condition is most likely?",
                condition.name, [c.name for c in others])
    stem = f"The image shows the characteristic imaging finding of {patient}'s condition. "
    if kind == "image_condition":
        return stem + "Which condition is most likely?", condition.name, [c.name for c in others]
    return (stem + "Which is the first-line treatment of the condition shown?", condition.treatment,
            [c.treatment for c in others])


def _options(correct: str, pool: list[str], rng) -> tuple[dict[str, str], str]:
    distractors = [pool[i] for i in rng.permutation(len(pool))[:3]]
    texts = [correct] + distractors
    order = rng.permutation(4)
    options = {"ABCD"[slot]: texts[order[slot]] for slot in range(4)}
    return options, "ABCD"[int(np.flatnonzero(order == 0)[0])]


def draw_finding(condition: Condition, rng: np.random.Generator) -> bytes:
    """A PNG drawing the condition's finding on a noisy dark background.

    Args:
        condition: whose shape, colour and count are drawn.
        rng: jitter of size, positions and noise.

    Returns:
        The PNG bytes ([H, W, 3] uint8, H and W in 56, 84, 112).
    """
    height, width = (int(rng.choice(SIDES)) for _ in range(2))
    noise = rng.normal(40, 6, size=(height, width, 3)).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(noise, "RGB")
    draw = ImageDraw.Draw(image)
    color, n, unit = COLORS[condition.color], condition.count, min(height, width)
    cy, cx = height / 2 + rng.uniform(-3, 3), width / 2 + rng.uniform(-3, 3)
    if condition.shape == "rings":
        for k in range(n):
            r = unit * (0.1 + 0.34 * (k + 1) / n)
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=color, width=2)
    elif condition.shape == "stripes":
        band = height / (2 * n + 1)
        for k in range(n):
            draw.rectangle([2, band * (2 * k + 1), width - 3, band * (2 * k + 2) - 1], fill=color)
    else:
        slot = width / n
        size = min(slot, height) * 0.3
        for k in range(n):
            x, y = slot * (k + 0.5) + rng.uniform(-1, 1), cy
            box = [x - size, y - size, x + size, y + size]
            if condition.shape == "dots":
                draw.ellipse(box, fill=color)
            elif condition.shape == "squares":
                draw.rectangle(box, fill=color)
            else:
                draw.line([x - size, y, x + size, y], fill=color, width=2)
                draw.line([x, y - size, x, y + size], fill=color, width=2)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _word(rng, syllables: int) -> str:
    return "".join(str(rng.choice(_SYLLABLES)) for _ in range(syllables))


def _unique(seen: set, make) -> str:
    while (value := make()) in seen:
        pass
    seen.add(value)
    return value


def _write_jsonl(path: str, rows: list[dict]) -> None:
    _write_if_changed(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode())


def _write_if_changed(path: str, data: bytes) -> None:
    """Writes atomically (temp file + rename), leaving a file with identical bytes untouched."""
    if os.path.isfile(path):
        with open(path, "rb") as file:
            if file.read() == data:
                return
    staging = f"{path}.tmp-{os.getpid()}"
    with open(staging, "wb") as file:
        file.write(data)
    os.replace(staging, path)


def _readme(num_train, num_eval, seed, multimodal, num_conditions) -> str:
    return (
        "# rwr_jax demo data: SYNTHETIC\n\n"
        "Generated by `rwr_jax.data.demo.generate_demo_data(out_dir, "
        f"num_train={num_train}, num_eval={num_eval}, seed={seed}, multimodal={multimodal}, "
        f"num_conditions={num_conditions})`.\n\n"
        "Every condition, finding and drug in these files is fictional; nothing here is medical "
        "knowledge. The facts a question asks for are stated only in `corpus.jsonl`, so retrieval "
        "is needed to answer. Use it to test the pipeline, never to evaluate a medical model.\n"
    )
