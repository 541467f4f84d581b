"""Texts with planted near-duplicates: the ground truth that calibrates the text thresholds of ``find_similar``.

Construction (everything drawn from one ``random.Random(seed)``, no network, no files):

- A **fact** is a (relation, entities) pair rendered as a QA text by one of the relation's
  ``len(TEMPLATES[relation])`` = 4 templates, e.g. "Q: Where was Mara Quell born? A: Mara Quell
  was born in Tessaly in 1931.". Five relations (born, invented, works, studied, married) take
  their entities from small invented vocabularies: 40 first × 40 last names (persons), 40 places,
  40 objects, 20 professions, 20 fields and the years 1820–1999. A person holds at most one fact
  per relation, so two facts never contradict each other.
- ``facts`` facts are drawn, each with a random template; ``targets`` of them are the targets.
  The others share the templates and the vocabularies of the targets, so look-alikes exist: the
  same template with other entities, the same person in another relation, persons sharing a first
  or last name (the text analogue of ordinary digits of the same class).
- Each target gets two kinds of planted near-duplicates, appended after the facts in a shuffled
  order and recorded separately:

  - ``copies`` **edited** copies: the target's text with 1–3 word edits (swap two adjacent words,
    delete a word, insert a filler word, or a one-letter typo), each on a different word and never
    on an entity word: the near-copies that MinHash over character n-grams is for.
  - ``copies`` **paraphrases**: the same fact rendered by each of ``copies`` other templates of its
    relation (question and answer reworded, the same entities): what sentence embeddings are for.

Every planted text contains all of its target's entities; no two texts are equal.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..validation import check_positive_int

FIRST = ("Mara Tobin Ilsa Corvin Yara Bram Neve Osric Lira Dace Fenna Jory Kesta Lucan Mirel Nilo Orla Pell Quinna "
         "Rhoswen Sable Tamsin Ulric Vesna Wren Xander Yelka Zorin Aldo Brisa Cato Delphine Eamon Fiora Galen Hesper "
         "Idris Juno Kael Liesel").split()
LAST = ("Quell Vark Ashdown Brennick Calloway Dunmore Everhart Falloway Grisby Holloran Ingleby Jastrow Kettering "
        "Lorne Marchbank Nettleford Oakhurst Pellingham Quarrie Rookwood Stannard Thistlewood Underhay Vantongeren "
        "Whitlock Yarrowby Zeller Abernathy Blackwood Crowther Darnell Ellery Fairbairn Gorringe Hatherley Inchbald "
        "Jessop Kilbride Lethbridge Morrow").split()
PLACES = ("Tessaly Orvane Brightmoor Calderra Dunvale Elmstead Farrowgate Glenmire Harrowby Islemont Jarnholt Kestrel "
          "Lowenmark Marisport Northwick Ostrava Pendleton Quillmoor Ravensholm Saltmere Thornbury Umberfield Valdoria "
          "Westerhall Yarrowmere Zennor Ambrose Bellhaven Corrin Drossel Estmere Fenwick Galloway Hollin Ivory "
          "Juniper Kingsreach Larkspur Mossgiel Nethercote").split()
OBJECTS = tuple(f"{a} {b}" for a, b in zip(
    ("Copper Tidal Glass Lantern Velvet Iron Amber Silver Cobalt Ember Quartz Willow Marble Ivory Brass Hollow "
     "Crimson Frost Granite Pewter").split() * 2,
    ("Loom Engine Compass Clock Sextant Organ Press Telescope Kiln Lamp").split() * 2
    + ("Barometer Furnace Harp Dial Pump Bellows Lens Anvil Spindle Prism").split() * 2))
PROFESSIONS = ("cartographer violinist glassblower astronomer botanist clockmaker shipwright apothecary architect "
               "bookbinder engraver surveyor chemist weaver potter stonemason librarian physician tailor brewer").split()
FIELDS = ("botany astronomy geology linguistics medicine chemistry philosophy mathematics music history "
          "architecture navigation painting law theology zoology optics metallurgy rhetoric anatomy").split()
YEARS = range(1820, 2000)
# Inserted by the "insert" edit: function words, which change the characters but not the fact.
FILLERS = ("really", "also", "then", "indeed", "just", "still", "once", "there")

# relation → 4 templates over its slots ({p} person, {q} second person, {c} place, {o} object,
# {j} profession, {f} field, {y} year). Each rewords the question and the answer.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "born": (
        "Q: Where was {p} born? A: {p} was born in {c} in {y}.",
        "Q: What is the birthplace of {p}? A: The birthplace of {p} is {c}, and the year of birth is {y}.",
        "Q: In which town did {p} come into the world? A: {p} came into the world in the town of {c} in {y}.",
        "Q: Tell me where and when {p} was born. A: In {y}, {p} was born in {c}.",
    ),
    "invented": (
        "Q: What did {p} invent? A: {p} invented the {o} in {y}.",
        "Q: Which invention is {p} known for? A: {p} is known for inventing the {o}, first built in {y}.",
        "Q: Who created the {o}? A: The {o} was created by {p} in the year {y}.",
        "Q: What device came from {p}? A: In {y}, {p} designed and built the {o}.",
    ),
    "works": (
        "Q: What does {p} do for a living? A: {p} works as a {j} in {c}.",
        "Q: What is the profession of {p}? A: The profession of {p} is {j}, practised in {c}.",
        "Q: Where and as what is {p} employed? A: {p} is employed in {c} as a {j}.",
        "Q: Which trade does {p} follow? A: In {c}, {p} earns a living as a {j}.",
    ),
    "studied": (
        "Q: What did {p} study? A: {p} studied {f} at the university of {c}.",
        "Q: Which subject was {p} trained in? A: {p} was trained in {f} at the academy in {c}.",
        "Q: Where did {p} learn {f}? A: The university of {c} is where {p} learned {f}.",
        "Q: What was the field of study of {p}? A: The field of {p} was {f}, taught to them in {c}.",
    ),
    "married": (
        "Q: Whom did {p} marry? A: {p} married {q} in {y}.",
        "Q: Who is the spouse of {p}? A: The spouse of {p} is {q}, wed in {y}.",
        "Q: Who did {p} wed, and when? A: In {y}, {p} and {q} were wed.",
        "Q: To whom was {p} married? A: {p} was married to {q} from {y} on.",
    ),
}
RELATIONS = tuple(TEMPLATES)


@dataclass(frozen=True)
class TextNearDuplicates:
    """The generated texts and their ground truth, the two kinds of near-duplicates kept apart."""

    texts: list[str]
    targets: list[int]
    edited: dict[int, list[int]]       # target → ids of its edited copies
    paraphrased: dict[int, list[int]]  # target → ids of its paraphrases
    entities: dict[int, tuple[str, ...]]  # target → the entity strings that all its near-duplicates contain

    @property
    def similar(self) -> dict[int, list[int]]:
        """target → ids of all its planted near-duplicates (edited copies, then paraphrases)."""
        return {t: self.edited[t] + self.paraphrased[t] for t in self.targets}


def _draw_fact(rng: random.Random, used: set[tuple[str, str]]) -> tuple[str, dict[str, str]]:
    """A (relation, slot values) not yet in ``used`` (person, relation), which it joins."""
    while True:
        relation = rng.choice(RELATIONS)
        person = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
        if (person, relation) not in used:
            break
    used.add((person, relation))
    spouse = person
    while spouse == person:
        spouse = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
    slots = {"p": person, "q": spouse, "c": rng.choice(PLACES), "o": rng.choice(OBJECTS),
             "j": rng.choice(PROFESSIONS), "f": rng.choice(FIELDS), "y": str(rng.choice(YEARS))}
    # Only the slots the relation's templates use are its entities (all 4 templates use the same ones).
    return relation, {k: v for k, v in slots.items() if "{" + k + "}" in TEMPLATES[relation][0]}


def _edit(text: str, protected: set[str], rng: random.Random) -> str:
    """``text`` with 1–3 word edits, each on a different word that is not in ``protected``."""
    words = text.split()
    touched = [w.strip(".,?") in protected or w in ("Q:", "A:") for w in words]  # entity words and markers stay
    for _ in range(rng.randint(1, 3)):
        free = [i for i, t in enumerate(touched) if not t]
        kind = rng.choice(("swap", "delete", "insert", "typo"))
        if kind == "swap":
            pairs = [i for i in free if i + 1 < len(words) and not touched[i + 1] and words[i] != words[i + 1]]
            if pairs:
                i = rng.choice(pairs)
                words[i], words[i + 1] = words[i + 1], words[i]
                touched[i] = touched[i + 1] = True
                continue
            kind = "typo"  # no adjacent free pair: fall back to an edit that always applies
        i = rng.choice(free)
        if kind == "delete":
            del words[i], touched[i]
        elif kind == "insert":
            words.insert(i, rng.choice(FILLERS))
            touched.insert(i, True)
        else:  # one letter replaced by another letter
            word = words[i]
            letters = [k for k, ch in enumerate(word) if ch.isalpha()]
            k = rng.choice(letters)
            new = rng.choice([ch for ch in "aeiourstnl" if ch != word[k].lower()])
            words[i] = word[:k] + new + word[k + 1:]
            touched[i] = True
    return " ".join(words)


def build_text_near_duplicates(*, facts: int = 240, targets: int = 20, copies: int = 3,
                               seed: int = 0) -> TextNearDuplicates:
    """Generate ``facts`` QA texts, ``targets`` of which get ``copies`` edited copies and ``copies``
    paraphrases each (module docstring). ``copies`` ≤ 3: a relation has 3 templates besides the target's."""
    facts = check_positive_int(facts, "facts")
    targets = check_positive_int(targets, "targets")
    copies = check_positive_int(copies, "copies")
    seed = check_positive_int(seed, "seed", minimum=0)
    n_templates = len(TEMPLATES[RELATIONS[0]])
    if copies > n_templates - 1:
        raise ValueError(f"copies={copies} must be <= {n_templates - 1}: each paraphrase uses another template")
    if targets > facts:
        raise ValueError(f"targets={targets} must be <= facts={facts}")
    rng = random.Random(seed)
    used: set[tuple[str, str]] = set()
    drawn = [(*_draw_fact(rng, used), rng.randrange(n_templates)) for _ in range(facts)]
    texts = [TEMPLATES[rel][t].format(**slots) for rel, slots, t in drawn]
    target_ids = sorted(rng.sample(range(facts), targets))
    planted: list[tuple[int, str, str]] = []  # (target, kind, text)
    seen = set(texts)
    for target in target_ids:
        rel, slots, t = drawn[target]
        protected = {w.strip(".,?") for v in slots.values() for w in v.split()}
        for _ in range(copies):
            text = texts[target]
            while text in seen:  # an edit may undo itself (e.g. a typo restoring a letter): draw again
                text = _edit(texts[target], protected, rng)
            seen.add(text)
            planted.append((target, "edited", text))
        for step in range(1, copies + 1):
            planted.append((target, "paraphrased", TEMPLATES[rel][(t + step) % n_templates].format(**slots)))
    rng.shuffle(planted)  # copies do not sit next to their target
    edited: dict[int, list[int]] = {t: [] for t in target_ids}
    paraphrased: dict[int, list[int]] = {t: [] for t in target_ids}
    for target, kind, text in planted:
        (edited if kind == "edited" else paraphrased)[target].append(len(texts))
        texts.append(text)
    entities = {t: tuple(drawn[t][1].values()) for t in target_ids}
    return TextNearDuplicates(texts, target_ids, edited, paraphrased, entities)


def text_near_duplicates(*, facts: int = 240, targets: int = 20, copies: int = 3,
                         seed: int = 0) -> tuple[list[str], list[int], dict[int, list[int]]]:
    """(texts, target ids, target → ids of its planted near-duplicates: edited copies and
    paraphrases); :func:`build_text_near_duplicates` keeps the two kinds apart."""
    data = build_text_near_duplicates(facts=facts, targets=targets, copies=copies, seed=seed)
    return data.texts, data.targets, data.similar


__all__ = ["TextNearDuplicates", "build_text_near_duplicates", "text_near_duplicates"]
