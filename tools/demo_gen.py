"""Generates the shipped demo data under ``loramoe_ds/data/demo/``.

``python tools/demo_gen.py`` (or ``python -m tools.demo_gen`` from the
repository root) writes (all text written here, all randomness seeded):

* ``eval_knowledge.jsonl`` / the knowledge part of ``train.jsonl``: closed-book
  QA facts (task_type 1) that the base SmolLM2-135M-Instruct answers correctly
  -- each candidate is checked by batched greedy generation (the answer or an
  alias must appear as a word) and only verified facts are kept. Each record
  carries ``aliases`` and three same-category ``distractors`` for
  log-likelihood ranking evaluation.
* ``eval_downstream.jsonl`` / the downstream part of ``train.jsonl``: seven
  programmatic tasks (task_type 0): sentiment, name extraction, number
  extraction, uppercase, list reversal, JSON formatting, arithmetic.

The knowledge records of the SFT mix answer in the base model's own words:
their ``output`` is the shortest run of whole sentences of the base's greedy
answer that contains the gold answer (:func:`own_words`), e.g. "The capital of
Peru is Lima." -- replaying the base's behaviour on knowledge inputs instead of
teaching a one-word format, which a 135M model answers worse (docs/results.md).
The eval files keep the short gold answers (scored by tolerant match).

``train.jsonl`` is the shuffled SFT mix of both, each knowledge record
repeated ``--knowledge-repeat`` times (default 8: 592 of 4,092 records, 14%;
LoRAMoE's own mix holds much world-knowledge QA, and a router can only learn to
tell knowledge inputs apart from the ones it sees); each record has a ``task``
name. Outputs are short so an example stays well under 64 tokens (plus the
chat template's ~30 tokens of scaffolding).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import re
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DEMO_DIR = Path(__file__).resolve().parents[1] / "loramoe_ds" / "data" / "demo"
SEED = 1234

# --------------------------------------------------------------------------- facts
# (subject, answer, aliases)
CAPITALS = [
    ("France", "Paris", []),
    ("Germany", "Berlin", []),
    ("Italy", "Rome", []),
    ("Spain", "Madrid", []),
    ("Portugal", "Lisbon", []),
    ("Japan", "Tokyo", []),
    ("China", "Beijing", ["Peking"]),
    ("Russia", "Moscow", []),
    ("Egypt", "Cairo", []),
    ("Canada", "Ottawa", []),
    ("Australia", "Canberra", []),
    ("Brazil", "Brasília", ["Brasilia"]),
    ("Argentina", "Buenos Aires", []),
    ("Mexico", "Mexico City", []),
    ("India", "New Delhi", ["Delhi"]),
    ("the United Kingdom", "London", []),
    ("Ireland", "Dublin", []),
    ("Greece", "Athens", []),
    ("Turkey", "Ankara", []),
    ("Norway", "Oslo", []),
    ("Sweden", "Stockholm", []),
    ("Finland", "Helsinki", []),
    ("Denmark", "Copenhagen", []),
    ("Poland", "Warsaw", []),
    ("Austria", "Vienna", []),
    ("Hungary", "Budapest", []),
    ("the Czech Republic", "Prague", []),
    ("the Netherlands", "Amsterdam", []),
    ("Belgium", "Brussels", []),
    ("Switzerland", "Bern", ["Berne"]),
    ("South Korea", "Seoul", []),
    ("Thailand", "Bangkok", []),
    ("Vietnam", "Hanoi", []),
    ("Indonesia", "Jakarta", []),
    ("the Philippines", "Manila", []),
    ("Kenya", "Nairobi", []),
    ("Nigeria", "Abuja", []),
    ("Peru", "Lima", []),
    ("Chile", "Santiago", []),
    ("Colombia", "Bogotá", ["Bogota"]),
    ("Cuba", "Havana", []),
    ("Iran", "Tehran", []),
    ("Iraq", "Baghdad", []),
    ("Saudi Arabia", "Riyadh", []),
    ("Pakistan", "Islamabad", []),
    ("Afghanistan", "Kabul", []),
    ("Ukraine", "Kyiv", ["Kiev"]),
    ("Romania", "Bucharest", []),
    ("Bulgaria", "Sofia", []),
    ("Serbia", "Belgrade", []),
    ("Croatia", "Zagreb", []),
    ("Iceland", "Reykjavik", ["Reykjavík"]),
    ("New Zealand", "Wellington", []),
    ("Ethiopia", "Addis Ababa", []),
    ("Morocco", "Rabat", []),
    ("Venezuela", "Caracas", []),
    ("Syria", "Damascus", []),
    ("Lebanon", "Beirut", []),
    ("Israel", "Jerusalem", []),
    ("the United States", "Washington, D.C.", ["Washington"]),
    ("Malaysia", "Kuala Lumpur", []),
    ("Singapore", "Singapore", []),
    ("Nepal", "Kathmandu", []),
    ("Bangladesh", "Dhaka", []),
    ("Sri Lanka", "Colombo", ["Sri Jayawardenepura Kotte"]),
    ("Ghana", "Accra", []),
    ("Senegal", "Dakar", []),
    ("Algeria", "Algiers", []),
    ("Tunisia", "Tunis", []),
    ("Libya", "Tripoli", []),
    ("Jamaica", "Kingston", []),
    ("Uruguay", "Montevideo", []),
    ("Paraguay", "Asunción", ["Asuncion"]),
    ("Ecuador", "Quito", []),
    ("Bolivia", "Sucre", ["La Paz"]),
    ("Estonia", "Tallinn", []),
    ("Latvia", "Riga", []),
    ("Lithuania", "Vilnius", []),
    ("Slovakia", "Bratislava", []),
    ("Slovenia", "Ljubljana", []),
    ("Scotland", "Edinburgh", []),
    ("Wales", "Cardiff", []),
    ("Mongolia", "Ulaanbaatar", ["Ulan Bator"]),
    ("Qatar", "Doha", []),
    ("Jordan", "Amman", []),
    ("Zimbabwe", "Harare", []),
    ("Uganda", "Kampala", []),
]
ELEMENTS = [
    ("gold", "Au"),
    ("silver", "Ag"),
    ("iron", "Fe"),
    ("copper", "Cu"),
    ("sodium", "Na"),
    ("potassium", "K"),
    ("lead", "Pb"),
    ("tin", "Sn"),
    ("mercury", "Hg"),
    ("oxygen", "O"),
    ("hydrogen", "H"),
    ("carbon", "C"),
    ("nitrogen", "N"),
    ("helium", "He"),
    ("neon", "Ne"),
    ("calcium", "Ca"),
    ("magnesium", "Mg"),
    ("zinc", "Zn"),
    ("chlorine", "Cl"),
    ("sulfur", "S"),
    ("aluminium", "Al"),
    ("silicon", "Si"),
    ("uranium", "U"),
    ("platinum", "Pt"),
    ("nickel", "Ni"),
    ("phosphorus", "P"),
    ("fluorine", "F"),
    ("lithium", "Li"),
    ("argon", "Ar"),
    ("iodine", "I"),
]
AUTHORS = [
    ("Pride and Prejudice", "Jane Austen", ["Austen"]),
    ("Romeo and Juliet", "William Shakespeare", ["Shakespeare"]),
    ("Hamlet", "William Shakespeare", ["Shakespeare"]),
    ("Macbeth", "William Shakespeare", ["Shakespeare"]),
    ("Nineteen Eighty-Four", "George Orwell", ["Orwell"]),
    ("Animal Farm", "George Orwell", ["Orwell"]),
    ("War and Peace", "Leo Tolstoy", ["Tolstoy"]),
    ("Anna Karenina", "Leo Tolstoy", ["Tolstoy"]),
    ("Crime and Punishment", "Fyodor Dostoevsky", ["Dostoevsky", "Dostoyevsky"]),
    ("Don Quixote", "Miguel de Cervantes", ["Cervantes"]),
    ("The Adventures of Tom Sawyer", "Mark Twain", ["Twain"]),
    ("Adventures of Huckleberry Finn", "Mark Twain", ["Twain"]),
    ("Oliver Twist", "Charles Dickens", ["Dickens"]),
    ("A Tale of Two Cities", "Charles Dickens", ["Dickens"]),
    ("Great Expectations", "Charles Dickens", ["Dickens"]),
    ("Moby-Dick", "Herman Melville", ["Melville"]),
    ("The Great Gatsby", "F. Scott Fitzgerald", ["Fitzgerald"]),
    ("The Old Man and the Sea", "Ernest Hemingway", ["Hemingway"]),
    ("To Kill a Mockingbird", "Harper Lee", []),
    ("The Hobbit", "J. R. R. Tolkien", ["Tolkien", "J.R.R. Tolkien"]),
    ("The Lord of the Rings", "J. R. R. Tolkien", ["Tolkien", "J.R.R. Tolkien"]),
    ("Harry Potter and the Philosopher's Stone", "J. K. Rowling", ["Rowling", "J.K. Rowling"]),
    ("Frankenstein", "Mary Shelley", ["Shelley"]),
    ("Dracula", "Bram Stoker", ["Stoker"]),
    ("Jane Eyre", "Charlotte Brontë", ["Charlotte Bronte", "Brontë", "Bronte"]),
    ("Wuthering Heights", "Emily Brontë", ["Emily Bronte", "Brontë", "Bronte"]),
    ("The Odyssey", "Homer", []),
    ("The Iliad", "Homer", []),
    ("The Divine Comedy", "Dante Alighieri", ["Dante"]),
    ("Les Misérables", "Victor Hugo", ["Hugo"]),
    ("The Origin of Species", "Charles Darwin", ["Darwin"]),
    ("The Catcher in the Rye", "J. D. Salinger", ["Salinger", "J.D. Salinger"]),
    ("Brave New World", "Aldous Huxley", ["Huxley"]),
    ("The Raven", "Edgar Allan Poe", ["Poe"]),
    ("Sherlock Holmes stories", "Arthur Conan Doyle", ["Conan Doyle", "Doyle"]),
    ("Alice's Adventures in Wonderland", "Lewis Carroll", ["Carroll"]),
    ("The Communist Manifesto", "Karl Marx", ["Marx"]),
    ("A Brief History of Time", "Stephen Hawking", ["Hawking"]),
]
# Free-form facts: (question, answer, aliases, category)
MISC = [
    ("Which planet is known as the Red Planet?", "Mars", [], "planet"),
    ("What is the largest planet in our solar system?", "Jupiter", [], "planet"),
    ("Which planet is closest to the Sun?", "Mercury", [], "planet"),
    ("Which planet is famous for its prominent rings?", "Saturn", [], "planet"),
    ("Which planet do we live on?", "Earth", [], "planet"),
    ("What is the hottest planet in our solar system?", "Venus", [], "planet"),
    ("Which planet is farthest from the Sun?", "Neptune", [], "planet"),
    ("Which planet rotates on its side?", "Uranus", [], "planet"),
    ("What is the name of Earth's natural satellite?", "the Moon", ["Moon"], "astro"),
    ("What star is at the center of our solar system?", "the Sun", ["Sun"], "astro"),
    ("What galaxy contains our solar system?", "the Milky Way", ["Milky Way"], "astro"),
    ("What is the largest ocean on Earth?", "the Pacific Ocean", ["Pacific"], "ocean"),
    (
        "Which ocean lies between Europe and North America?",
        "the Atlantic Ocean",
        ["Atlantic"],
        "ocean",
    ),
    ("What is the longest river in South America?", "the Amazon", ["Amazon"], "river"),
    ("What is the longest river in Africa?", "the Nile", ["Nile"], "river"),
    ("Which river flows through London?", "the Thames", ["Thames"], "river"),
    ("Which river flows through Paris?", "the Seine", ["Seine"], "river"),
    ("What is the highest mountain in the world?", "Mount Everest", ["Everest"], "mountain"),
    ("What is the largest desert in Africa?", "the Sahara", ["Sahara"], "desert"),
    ("What is the largest continent?", "Asia", [], "continent"),
    ("On which continent is Egypt located?", "Africa", [], "continent"),
    ("On which continent is Brazil located?", "South America", [], "continent"),
    ("On which continent is Germany located?", "Europe", [], "continent"),
    ("Which continent is home to kangaroos?", "Australia", ["Oceania"], "continent"),
    ("Which continent is covered almost entirely by ice?", "Antarctica", [], "continent"),
    ("What is the chemical formula of water?", "H2O", ["H₂O"], "formula"),
    (
        "What gas do plants absorb from the air for photosynthesis?",
        "carbon dioxide",
        ["CO2"],
        "gas",
    ),
    ("What gas do humans need to breathe to survive?", "oxygen", [], "gas"),
    ("What is the most abundant gas in Earth's atmosphere?", "nitrogen", [], "gas"),
    ("What is the hardest natural substance?", "diamond", [], "material"),
    ("What organ pumps blood through the human body?", "the heart", ["heart"], "organ"),
    ("What organ do humans use to think?", "the brain", ["brain"], "organ"),
    ("What is the largest organ of the human body?", "the skin", ["skin"], "organ"),
    ("Which organ filters blood to produce urine?", "the kidney", ["kidneys", "kidney"], "organ"),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci", ["da Vinci", "Leonardo"], "painter"),
    ("Who painted The Starry Night?", "Vincent van Gogh", ["van Gogh"], "painter"),
    ("Who painted the ceiling of the Sistine Chapel?", "Michelangelo", [], "painter"),
    ("Who painted Guernica?", "Pablo Picasso", ["Picasso"], "painter"),
    ("Who developed the theory of relativity?", "Albert Einstein", ["Einstein"], "scientist"),
    (
        "Who formulated the laws of motion and universal gravitation?",
        "Isaac Newton",
        ["Newton"],
        "scientist",
    ),
    ("Who invented the telephone?", "Alexander Graham Bell", ["Graham Bell", "Bell"], "scientist"),
    ("Who discovered penicillin?", "Alexander Fleming", ["Fleming"], "scientist"),
    (
        "Who proposed the theory of evolution by natural selection?",
        "Charles Darwin",
        ["Darwin"],
        "scientist",
    ),
    ("Who invented the light bulb?", "Thomas Edison", ["Edison"], "scientist"),
    ("Who was the first person to walk on the Moon?", "Neil Armstrong", ["Armstrong"], "person"),
    (
        "Who was the first President of the United States?",
        "George Washington",
        ["Washington"],
        "person",
    ),
    (
        "Who composed the Fifth Symphony that begins with four famous notes?",
        "Ludwig van Beethoven",
        ["Beethoven"],
        "composer",
    ),
    ("Who composed The Magic Flute?", "Wolfgang Amadeus Mozart", ["Mozart"], "composer"),
    ("What is the currency of Japan?", "the yen", ["yen"], "currency"),
    ("What is the currency of the United Kingdom?", "the pound sterling", ["pound"], "currency"),
    ("What is the currency of the United States?", "the US dollar", ["dollar"], "currency"),
    ("What is the currency used in Germany?", "the euro", ["euro"], "currency"),
    ("What is the currency of India?", "the Indian rupee", ["rupee"], "currency"),
    ("What is the currency of China?", "the renminbi", ["yuan", "renminbi", "RMB"], "currency"),
    ("What is the currency of Russia?", "the ruble", ["ruble", "rouble"], "currency"),
    ("What is the currency of Mexico?", "the Mexican peso", ["peso"], "currency"),
    ("What is the official language of Brazil?", "Portuguese", [], "language"),
    ("What is the official language of Mexico?", "Spanish", [], "language"),
    ("What language is mainly spoken in France?", "French", [], "language"),
    ("What language is mainly spoken in Germany?", "German", [], "language"),
    ("What language is mainly spoken in Italy?", "Italian", [], "language"),
    ("What language is mainly spoken in Japan?", "Japanese", [], "language"),
    ("What language is mainly spoken in Russia?", "Russian", [], "language"),
    (
        "What language is mainly spoken in China?",
        "Mandarin Chinese",
        ["Mandarin", "Chinese"],
        "language",
    ),
    ("What language is mainly spoken in Egypt?", "Arabic", [], "language"),
    ("What language is mainly spoken in the Netherlands?", "Dutch", [], "language"),
    ("What language is mainly spoken in Greece?", "Greek", [], "language"),
    ("What language is mainly spoken in Sweden?", "Swedish", [], "language"),
    ("What is the largest mammal?", "the blue whale", ["blue whale", "whale"], "animal"),
    ("What is the fastest land animal?", "the cheetah", ["cheetah"], "animal"),
    ("What is the tallest animal?", "the giraffe", ["giraffe"], "animal"),
    ("Which animal is known as the king of the jungle?", "the lion", ["lion"], "animal"),
    (
        "What animal is the national symbol of China and eats bamboo?",
        "the giant panda",
        ["panda"],
        "animal",
    ),
    ("What is the largest bird in the world?", "the ostrich", ["ostrich"], "animal"),
    ("Which bird is a symbol of peace?", "the dove", ["dove"], "animal"),
    ("What do bees make?", "honey", [], "food"),
    ("What is the main ingredient of guacamole?", "avocado", [], "food"),
    ("What is the main ingredient of hummus?", "chickpeas", ["chickpea"], "food"),
    ("From which country does sushi originate?", "Japan", [], "country"),
    ("From which country does pizza originate?", "Italy", [], "country"),
    ("In which country are the pyramids of Giza?", "Egypt", [], "country"),
    ("In which country is the Eiffel Tower?", "France", [], "country"),
    ("In which country is the Great Wall?", "China", [], "country"),
    ("In which country is the Taj Mahal?", "India", [], "country"),
    ("In which country is the Colosseum?", "Italy", [], "country"),
    ("In which country is Machu Picchu?", "Peru", [], "country"),
    (
        "In which country is the Statue of Liberty?",
        "the United States",
        ["United States", "USA", "America"],
        "country",
    ),
    ("In which city is the Eiffel Tower?", "Paris", [], "city"),
    ("In which city is Big Ben?", "London", [], "city"),
    ("In which city is the Colosseum?", "Rome", [], "city"),
    ("In which city is the Kremlin?", "Moscow", [], "city"),
    ("Which city is known as the Big Apple?", "New York City", ["New York"], "city"),
    ("What is the boiling point of water in degrees Celsius?", "100 degrees", ["100"], "number"),
    ("How many continents are there on Earth?", "seven", ["7"], "number"),
    ("How many days are there in a week?", "seven", ["7"], "number"),
    ("How many legs does a spider have?", "eight", ["8"], "number"),
    ("How many sides does a triangle have?", "three", ["3"], "number"),
    ("How many sides does a hexagon have?", "six", ["6"], "number"),
    ("How many hours are there in a day?", "24", ["twenty-four"], "number"),
    ("How many months are there in a year?", "twelve", ["12"], "number"),
    ("What color is the sky on a clear day?", "blue", [], "color"),
    ("What color are ripe bananas?", "yellow", [], "color"),
    ("What color is grass?", "green", [], "color"),
    ("What color do you get by mixing blue and yellow?", "green", [], "color"),
    ("What color is snow?", "white", [], "color"),
    ("What is frozen water called?", "ice", [], "material"),
    ("What is the opposite of hot?", "cold", [], "word"),
    ("What is the opposite of up?", "down", [], "word"),
    ("Which sport is played at Wimbledon?", "tennis", [], "sport"),
    (
        "In which sport do players try to score a touchdown?",
        "American football",
        ["football"],
        "sport",
    ),
    ("Which sport uses a bat, a ball and wickets?", "cricket", [], "sport"),
    ("What instrument has 88 keys?", "the piano", ["piano"], "instrument"),
    (
        "What is the freezing point of water in degrees Celsius?",
        "0 degrees",
        ["0", "zero"],
        "number",
    ),
    ("What metal is liquid at room temperature?", "mercury", [], "material"),
]

# Extra same-kind wrong answers for categories too small to supply 3 distractors.
EXTRA_DISTRACTORS = {
    "astro": ["the Andromeda Galaxy", "Mars", "Alpha Centauri", "Jupiter"],
    "ocean": ["the Indian Ocean", "the Arctic Ocean", "the Southern Ocean"],
    "mountain": ["K2", "Mont Blanc", "Kilimanjaro", "Mount Fuji"],
    "desert": ["the Gobi", "the Kalahari", "the Atacama"],
    "formula": ["CO2", "NaCl", "O2", "H2O2"],
    "gas": ["helium", "hydrogen", "argon"],
    "material": ["gold", "granite", "steel", "glass"],
    "person": ["Buzz Aldrin", "Abraham Lincoln", "Yuri Gagarin", "Thomas Jefferson"],
    "composer": ["Johann Sebastian Bach", "Frédéric Chopin", "Joseph Haydn"],
    "word": ["warm", "left", "high", "fast"],
    "sport": ["golf", "basketball", "rugby", "baseball"],
    "instrument": ["the guitar", "the violin", "the flute"],
    "food": ["rice", "tomato", "milk", "lentils"],
    "number": [
        "three",
        "four",
        "five",
        "six",
        "seven",
        "eight",
        "nine",
        "ten",
        "twelve",
        "24",
        "100 degrees",
        "0 degrees",
        "50 degrees",
    ],
}


def knowledge_candidates() -> list[dict[str, Any]]:
    """All candidate facts as records (before verification), with distractors."""
    rng = random.Random(SEED)
    facts: list[tuple[str, str, list[str], str]] = []
    for country, city, al in CAPITALS:
        facts.append((f"What is the capital of {country}?", city, al, "capital"))
    for name, sym in ELEMENTS:
        facts.append((f"What is the chemical symbol of {name}?", sym, [], "element"))
    for book, author, al in AUTHORS:
        facts.append((f"Who wrote {book}?", author, al, "author"))
    facts.extend(MISC)
    by_cat: dict[str, list[str]] = {}
    for _, a, _, cat in facts:
        by_cat.setdefault(cat, [])
        if a not in by_cat[cat]:
            by_cat[cat].append(a)
    out = []
    for q, a, al, cat in facts:
        wrong = {x.lower() for x in [a, *al]}
        pool = [x for x in by_cat[cat] if x.lower() not in wrong]
        pool += [
            x for x in EXTRA_DISTRACTORS.get(cat, []) if x.lower() not in wrong and x not in pool
        ]
        if len(pool) < 3:
            raise AssertionError(f"category {cat!r} has too few distractors for {q!r}")
        out.append(
            {
                "instruction": q,
                "input": "",
                "output": a,
                "task_type": 1,
                "task": f"knowledge/{cat}",
                "aliases": al,
                "distractors": rng.sample(pool, 3),
            }
        )
    return out


def answer_matches(generation: str, answer: str, aliases: list[str]) -> bool:
    """True if the answer or an alias appears as whole words in the generation."""
    text = generation.lower()
    for cand in [answer, *aliases]:
        c = cand.lower()
        if c.startswith("the "):
            c = c[4:]
        if re.search(r"(?<![\w])" + re.escape(c) + r"(?![\w])", text):
            return True
    return False


def own_words(generation: str, answer: str, aliases: list[str]) -> str | None:
    """The shortest prefix of whole sentences of ``generation`` that contains the answer.

    Sentences end at ``.``, ``!`` or ``?`` followed by a space or the end; ``None``
    when no complete-sentence prefix contains the answer or an alias.
    """
    text = " ".join(generation.split())
    ends = [m.end() for m in re.finditer(r"[.!?](?=\s|$)", text)]
    for end in ends:
        if answer_matches(text[:end], answer, aliases):
            return text[:end]
    return None


def verify_with_model(
    records: list[dict[str, Any]],
    model_dir: Path,
    batch_size: int = 16,
    max_new_tokens: int = 24,
) -> list[str]:
    """Greedy-generates an answer for each record; returns the generations."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loramoe_ds.config import DataConfig
    from loramoe_ds.data.tokenize import PromptFormatter

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    fmt = PromptFormatter(tok, DataConfig())
    gens: list[str] = []
    t0 = time.perf_counter()
    for i in range(0, len(records), batch_size):
        chunk = records[i : i + batch_size]
        prompts = [fmt(r["instruction"], r["input"]) for r in chunk]
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out_BT = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
        new_BT = out_BT[:, enc["input_ids"].shape[1] :]
        gens.extend(tok.batch_decode(new_BT, skip_special_tokens=True))
        logger.info("verified %d/%d (%.0f s)", len(gens), len(records), time.perf_counter() - t0)
    return gens


# ---------------------------------------------------------------------- downstream
NAMES = [
    "Alice",
    "Bob",
    "Carlos",
    "Dana",
    "Elena",
    "Farid",
    "Grace",
    "Hiro",
    "Ines",
    "Jonas",
    "Kira",
    "Liam",
    "Maya",
    "Nora",
    "Omar",
    "Priya",
    "Quinn",
    "Rosa",
    "Sven",
    "Tara",
]
ITEMS = [
    "apples",
    "books",
    "chairs",
    "tickets",
    "bottles",
    "pencils",
    "stamps",
    "candles",
    "shirts",
    "plates",
    "boxes",
    "cookies",
]
PLACES = [
    "the market",
    "the library",
    "the station",
    "the bakery",
    "the museum",
    "the park",
    "the office",
    "the harbor",
]
POS_ADJ = [
    "wonderful",
    "excellent",
    "delightful",
    "fantastic",
    "great",
    "lovely",
    "superb",
    "charming",
    "brilliant",
    "pleasant",
]
NEG_ADJ = [
    "terrible",
    "awful",
    "boring",
    "disappointing",
    "horrible",
    "dreadful",
    "poor",
    "annoying",
    "bland",
    "unpleasant",
]
SUBJECTS = [
    "movie",
    "meal",
    "hotel",
    "concert",
    "book",
    "service",
    "game",
    "trip",
    "show",
    "coffee",
    "phone",
    "class",
]
SENT_TEMPLATES = [
    "The {s} was {a}.",
    "I found the {s} {a}.",
    "What a {a} {s}!",
    "Honestly, the {s} felt {a} from start to finish.",
    "Our {s} yesterday was {a}.",
]
WORDS = [
    "river",
    "stone",
    "cloud",
    "garden",
    "window",
    "silver",
    "forest",
    "candle",
    "mirror",
    "harbor",
    "lantern",
    "meadow",
    "pepper",
    "violin",
    "orbit",
    "tiger",
    "maple",
    "copper",
]
FRUITS = [
    "apple",
    "pear",
    "fig",
    "plum",
    "kiwi",
    "mango",
    "lemon",
    "grape",
    "peach",
    "cherry",
    "melon",
    "lime",
]


def _sentiment(rng: random.Random) -> tuple[str, str, str]:
    pos = rng.random() < 0.5
    a = rng.choice(POS_ADJ if pos else NEG_ADJ)
    text = rng.choice(SENT_TEMPLATES).format(s=rng.choice(SUBJECTS), a=a)
    return (
        "Classify the sentiment of the review as positive or negative.",
        text,
        "positive" if pos else "negative",
    )


def _extract_name(rng: random.Random) -> tuple[str, str, str]:
    n = rng.choice(NAMES)
    t = rng.choice(
        [
            "Yesterday {n} went to {p} to buy {k} {i}.",
            "At {p}, {n} counted {k} {i}.",
            "The {i} at {p} were sorted by {n}.",
            "{n} left {k} {i} near {p}.",
        ]
    )
    text = t.format(n=n, p=rng.choice(PLACES), k=rng.randint(2, 99), i=rng.choice(ITEMS))
    return "Extract the person's name from the sentence.", text, n


def _extract_number(rng: random.Random) -> tuple[str, str, str]:
    k = rng.randint(2, 999)
    t = rng.choice(
        [
            "{n} bought {k} {i} at {p}.",
            "There were {k} {i} waiting at {p}.",
            "At {p}, {n} found exactly {k} {i}.",
        ]
    )
    text = t.format(n=rng.choice(NAMES), p=rng.choice(PLACES), k=k, i=rng.choice(ITEMS))
    return "Extract the number from the sentence.", text, str(k)


def _uppercase(rng: random.Random) -> tuple[str, str, str]:
    text = " ".join(rng.sample(WORDS, rng.randint(2, 4)))
    return "Convert the text to uppercase.", text, text.upper()


def _reverse_list(rng: random.Random) -> tuple[str, str, str]:
    xs = rng.sample(FRUITS, rng.randint(3, 5))
    return ("Reverse the order of the list.", ", ".join(xs), ", ".join(reversed(xs)))


def _to_json(rng: random.Random) -> tuple[str, str, str]:
    n, age = rng.choice(NAMES), rng.randint(18, 90)
    text = rng.choice(["{n} is {a} years old.", "{n}, aged {a}.", "Age {a}, name {n}."]).format(
        n=n, a=age
    )
    return (
        "Convert the details to JSON with keys name and age.",
        text,
        json.dumps({"name": n, "age": age}),
    )


def _arithmetic(rng: random.Random) -> tuple[str, str, str]:
    digits = rng.choice([2, 3])
    lo, hi = 10 ** (digits - 1), 10**digits - 1
    a, b = rng.randint(lo, hi), rng.randint(lo, hi)
    if rng.random() < 0.5:
        return "Compute the sum.", f"{a} + {b}", str(a + b)
    a, b = max(a, b), min(a, b)
    return "Compute the difference.", f"{a} - {b}", str(a - b)


TASKS = {
    "sentiment": _sentiment,
    "extract_name": _extract_name,
    "extract_number": _extract_number,
    "uppercase": _uppercase,
    "reverse_list": _reverse_list,
    "to_json": _to_json,
    "arithmetic": _arithmetic,
}


def downstream_records(n_train: int, n_eval: int) -> tuple[list[dict], list[dict]]:
    """Generates ``n_train`` + ``n_eval`` unique records per task (eval disjoint)."""
    train, evals = [], []
    for t_idx, (name, fn) in enumerate(TASKS.items()):
        rng = random.Random(SEED * 100 + t_idx)
        seen: set[tuple[str, str]] = set()
        recs: list[dict] = []
        tries = 0
        while len(recs) < n_train + n_eval:
            tries += 1
            if tries > 100 * (n_train + n_eval):
                raise RuntimeError(f"task {name}: cannot generate enough unique records")
            ins, inp, out = fn(rng)
            if (ins, inp) in seen:
                continue
            seen.add((ins, inp))
            recs.append(
                {"instruction": ins, "input": inp, "output": out, "task_type": 0, "task": name}
            )
        evals.extend(recs[:n_eval])
        train.extend(recs[n_eval:])
    return train, evals


def interleave_by_task(records: list[dict]) -> list[dict]:
    """Round-robin over tasks, so the first N records of an eval file cover every task."""
    by_task: dict[str, list[dict]] = {}
    for r in records:
        by_task.setdefault(r["task"], []).append(r)
    queues = list(by_task.values())
    out = []
    for i in range(max(len(q) for q in queues)):
        out.extend(q[i] for q in queues if i < len(q))
    return out


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    logger.info("wrote %d records to %s", len(records), path)


def main(argv: list[str] | None = None) -> None:
    """Command line entry point; see the module docstring."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=DEMO_DIR)
    ap.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="HF model dir to verify facts against (default: embedded SmolLM2)",
    )
    ap.add_argument("--train-per-task", type=int, default=500)
    ap.add_argument("--eval-per-task", type=int, default=60)
    ap.add_argument("--knowledge-train-frac", type=float, default=0.4)
    ap.add_argument("--knowledge-repeat", type=int, default=8)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    model_dir = args.model_dir
    if model_dir is None:
        from loramoe_ds.smollm2 import ensure_smollm2

        model_dir = ensure_smollm2()
    cands = knowledge_candidates()
    gens = verify_with_model(cands, model_dir)
    known = [r for r, g in zip(cands, gens) if answer_matches(g, r["output"], r["aliases"])]
    said = {id(r): own_words(g, r["output"], r["aliases"]) for r, g in zip(cands, gens)}
    logger.info("base model answers %d/%d candidate facts correctly", len(known), len(cands))
    for r, g in zip(cands, gens):
        if r not in known:
            logger.debug("unknown: %s -> %r (want %s)", r["instruction"], g, r["output"])
    rng = random.Random(SEED)
    rng.shuffle(known)
    n_k_train = int(len(known) * args.knowledge_train_frac)
    k_train, k_eval = known[:n_k_train], known[n_k_train:]

    d_train, d_eval = downstream_records(args.train_per_task, args.eval_per_task)
    # Knowledge records train on the base's own sentence (the gold answer when the
    # answer was not inside a complete sentence); the eval keeps the short gold.
    k_replay = [
        {**{k: v for k, v in r.items() if k not in ("aliases", "distractors")},
         "output": said[id(r)] or r["output"]}
        for r in k_train
    ]  # fmt: skip
    train = d_train + args.knowledge_repeat * k_replay
    rng.shuffle(train)
    args.out.mkdir(parents=True, exist_ok=True)
    _write_jsonl(args.out / "train.jsonl", train)
    _write_jsonl(args.out / "eval_downstream.jsonl", interleave_by_task(d_eval))
    _write_jsonl(args.out / "eval_knowledge.jsonl", k_eval)
    _write_jsonl(args.out / "knowledge_train.jsonl", k_replay)


if __name__ == "__main__":
    main()
