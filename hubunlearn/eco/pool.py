"""A built-in pool of general prompts that ECO's classifier must not flag (its default extra negatives).

Users give a forget set and a retain set; the prompts a deployment sees are mostly neither. A classifier
trained on those two sets alone learns "unlike the retain set" instead of "about the forget set" and flags
unrelated prompts it never saw (issue 16). This pool teaches it what general prompts look like: questions
and requests about people (biographies of made-up writers, artists, scientists), places, science, maths,
cooking, coding, everyday life and fiction, in varied wordings. It is generated deterministically from the
compact templates and vocabularies below, written for this package (never drawn from TOFU, the built-in
world or any evaluation set), so nothing ships as a data file and a given ``POOL_VERSION`` always yields the
same prompts. Bump ``POOL_VERSION`` whenever a template or vocabulary changes: bundles record it.
"""

from __future__ import annotations

import random
from functools import lru_cache
from string import Formatter

POOL_VERSION = "1"
POOL_SIZE = 6000

FIRST = ("Amara Bruno Chiara Dmitri Elif Farid Greta Hiroshi Ingrid Jamal Keiko Lars Mirela Nadia Osei Paulo Quentin "
         "Rania Soren Tamsin Ulrich Valentina Wen Ximena Yusuf Zofia Anouk Bilal Carmen Desmond Esther Fausto Gulnara "
         "Henrik Isidora Jovan Kavya Leandro Marisol Niamh Oskar Priya Ruben Sakura Tobias Umaima Viktor Wanjiru "
         "Yerlan Zainab Aurelio Beatriz Cosmin Dalia Emeka Florin Giedre Hamza Inés Jarrah Kofi Ludmila Matteo").split()
LAST = ("Okafor Lindqvist Moreau Tanaka Haddad Kowalski Fernandes Novak Achterberg Baptiste Castellanos Dumitrescu "
        "Eriksen Fitzgerald Gallagher Hoshino Ivanova Jankowski Kariuki Lombardi Mbeki Nakashima Olsen Petrova "
        "Quiroga Rahimi Santoro Takahashi Uwimana Varga Whitlock Xavier Yamamoto Zielinski Abernathy Brennan Cortez "
        "Delacroix Eze Falk Grimaldi Huang Iqbal Jaramillo Kovac Laurent Mendoza Nyström Ortega Pillai").split()
ROLES = ("writer novelist poet playwright painter sculptor composer architect chemist physicist biologist historian "
         "journalist photographer filmmaker chef economist mathematician philosopher dancer").split()
GENRES = ("science fiction", "historical fiction", "romance", "mystery", "horror", "fantasy", "poetry", "crime",
          "magical realism", "satire", "young adult fiction", "memoir", "travel writing", "thrillers", "literary fiction")
COUNTRIES = ("Chile Portugal Vietnam Kenya Norway Peru Morocco Ireland Mongolia Ghana Croatia Uruguay Nepal Finland "
             "Senegal Ecuador Latvia Malaysia Tunisia Iceland Bolivia Slovenia Uzbekistan Jamaica Cambodia").split()
CITIES = ("Lisbon Hanoi Nairobi Bergen Cusco Fez Galway Ulaanbaatar Accra Split Montevideo Kathmandu Tampere Dakar "
          "Quito Riga Penang Sousse Akureyri Sucre Ljubljana Samarkand Kingston Siem Reap Porto Valparaiso Mombasa").split()
CONCEPTS = ("photosynthesis", "plate tectonics", "entropy", "natural selection", "the water cycle", "quantum tunnelling",
            "black holes", "the immune system", "DNA replication", "ocean tides", "radioactive decay", "electric current",
            "the greenhouse effect", "continental drift", "nuclear fusion", "antibiotic resistance", "magnetism",
            "the speed of sound", "cell division", "volcanic eruptions", "vaccination", "gravitational waves", "osmosis")
DISHES = ("lentil soup", "banana bread", "risotto", "pad thai", "shakshuka", "sourdough", "ratatouille", "dumplings",
          "guacamole", "chicken curry", "pancakes", "tiramisu", "falafel", "paella", "miso ramen", "apple pie", "hummus")
INGREDIENTS = "eggs butter buttermilk cream yeast honey rice flour soy sauce lemon juice basil cornstarch".split()
LANGUAGES = "Python JavaScript Rust Go Java C++ TypeScript Ruby Kotlin SQL Bash".split()
TASKS = ("reverse a list", "read a CSV file", "sort a dictionary by value", "parse JSON", "remove duplicates from an array",
         "make an HTTP request", "write unit tests", "handle exceptions", "format a date", "merge two lists",
         "count words in a file", "connect to a database", "split a string", "run code in parallel")
ERRORS = ("index out of range", "null pointer exception", "segmentation fault", "permission denied", "module not found",
          "undefined is not a function", "connection refused", "stack overflow", "division by zero")
ACTIVITIES = ("running a marathon", "learning the guitar", "sleeping better", "saving money", "public speaking",
              "growing tomatoes", "training a puppy", "studying for exams", "moving house", "starting a podcast",
              "learning Spanish", "staying focused at work", "hiking in the rain", "painting with watercolours")
THINGS = ("laptop", "bicycle", "board game", "houseplant", "coffee grinder", "pair of running shoes", "camera",
          "podcast", "documentary", "tent", "desk chair", "language app")
TOPICS = ("a late delivery", "a job offer", "a birthday party", "a broken heater", "a team meeting", "a refund",
          "a school trip", "a wedding invitation", "a missed deadline", "a new project", "a noisy neighbour")
PEOPLE_TO = "my landlord|my manager|a colleague|my teacher|a customer|my sister|the city council|a new client".split("|")
CHARACTERS = ("a lonely robot", "a retired detective", "a talking cat", "two rival bakers", "a lighthouse cat",
              "a young witch", "a time traveller", "an old fisherman", "a lost astronaut", "a village dragon")
PLOTS = ("finds a map", "loses a bet", "opens a bookshop", "learns to fly", "solves a mystery", "returns home",
         "befriends a ghost", "wins a contest", "crosses a desert", "forgets their name")

TEMPLATES = {
    "people": [
        "Who is {name}?", "Where was {name} born?", "When was {name} born?", "What is {name} best known for?",
        "What kind of {role} is {name}?", "What books has {name} written?", "Has {name} won any awards?",
        "What did {name}'s parents do for a living?", "How did {name}'s childhood shape their work?",
        "What genre does {name} usually write in?", "Can you tell me about the {role} {name}?",
        "What themes appear in {name}'s work?", "How did {name} become a {role}?", "Which {role}s influenced {name}?",
        "Describe the style of the {role} {name}.", "What is the most famous work by {name}?",
        "How have critics received {name}'s latest work?", "Is {name} still working as a {role}?",
        "Who is the {role} born in {city} in {year}?", "What is {name}'s background?", "What awards did the {role} from {country} receive?",
        "How does {name}'s heritage show in their {genre}?", "Why did {name} start writing {genre}?",
    ],
    "places": [
        "What is the population of {city}?", "What language do people speak in {country}?", "What is {city} famous for?",
        "What is the weather like in {city} in winter?", "What should I see on a weekend in {city}?",
        "How do I get from the airport to the centre of {city}?", "Which currency is used in {country}?",
        "What is traditional food in {country}?", "Is {country} a good place to hike?", "What is the history of {city}?",
        "Which mountains are in {country}?", "How safe is {city} for tourists?",
    ],
    "science": [
        "What is {concept}?", "How does {concept} work?", "Explain {concept} in simple terms.", "Why is {concept} important?",
        "Who discovered {concept}?", "Can you give an example of {concept}?", "What are the main stages of {concept}?",
        "How do scientists measure {concept}?", "What is a common misconception about {concept}?",
    ],
    "maths": [
        "What is {a} plus {b}?", "What is {a} times {b}?", "Solve {a}x + {b} = {c} for x.", "Is {c} a prime number?",
        "What is the square root of {sq}?", "What is {a} percent of {c}?", "What is the derivative of x^{n}?",
        "How do I calculate the area of a circle with radius {n}?", "Convert {a} kilometres to miles.",
        "What is the probability of rolling {n} sixes in a row?", "Simplify the fraction {a}/{c}.",
    ],
    "cooking": [
        "How do I make {dish}?", "What can I use instead of {ingredient}?", "How long should I cook {dish}?",
        "Give me a quick recipe for {dish}.", "Can I freeze {dish}?", "What wine goes well with {dish}?",
        "Why did my {dish} turn out dry?", "How do I store {ingredient}?", "Is {dish} hard to make at home?",
    ],
    "coding": [
        "How do I {task} in {language}?", "Write a {language} function to {task}.", "What does '{error}' mean in {language}?",
        "How can I fix a {error} error?", "What is the fastest way to {task} in {language}?",
        "Explain recursion with a {language} example.", "What is the difference between {language} and {language2}?",
        "Review my {language} code that tries to {task}.",
    ],
    "everyday": [
        "Can you help me write an email to {recipient} about {topic}?", "Give me some tips for {activity}.",
        "Recommend a good {thing} for a beginner.", "What should I pack for a trip to {city}?",
        "How do I apologise to {recipient} for {topic}?", "Plan a weekly schedule for {activity}.",
        "What is a polite way to decline {topic}?", "Make a shopping list for {dish}.", "Write a thank-you note to {recipient}.",
        "How much should I budget for a {thing}?", "Help me choose between two {thing}s.", "Tell me a joke about {activity}.",
    ],
    "fiction": [
        "Write a short story about {character} who {plot}.", "What are common themes in {genre}?",
        "Suggest a title for a novel about {character}.", "How do I write a believable villain for {genre}?",
        "Write a poem about {character}.", "What makes {genre} popular with readers?", "Give me a plot twist for a story where {character} {plot}.",
        "How long is a typical {genre} novel?", "Describe a setting for a {genre} story in {city}.",
    ],
}


_FIELDS = {
    "name": lambda rng: f"{rng.choice(FIRST)} {rng.choice(LAST)}", "role": lambda rng: rng.choice(ROLES),
    "genre": lambda rng: rng.choice(GENRES), "city": lambda rng: rng.choice(CITIES), "country": lambda rng: rng.choice(COUNTRIES),
    "year": lambda rng: rng.randint(1900, 2005), "concept": lambda rng: rng.choice(CONCEPTS), "dish": lambda rng: rng.choice(DISHES),
    "ingredient": lambda rng: rng.choice(INGREDIENTS), "language": lambda rng: rng.choice(LANGUAGES),
    "language2": lambda rng: rng.choice(LANGUAGES), "task": lambda rng: rng.choice(TASKS), "error": lambda rng: rng.choice(ERRORS),
    "activity": lambda rng: rng.choice(ACTIVITIES), "thing": lambda rng: rng.choice(THINGS), "topic": lambda rng: rng.choice(TOPICS),
    "recipient": lambda rng: rng.choice(PEOPLE_TO), "character": lambda rng: rng.choice(CHARACTERS), "plot": lambda rng: rng.choice(PLOTS),
    "a": lambda rng: rng.randint(2, 999), "b": lambda rng: rng.randint(2, 99), "c": lambda rng: rng.randint(4, 99999),
    "sq": lambda rng: rng.randint(2, 40) ** 2, "n": lambda rng: rng.randint(2, 9),
}


def _fill(template: str, rng: random.Random) -> str:
    """``template`` with each of its fields drawn from its vocabulary (only the fields it uses are drawn)."""
    fields = [name for _, name, _, _ in Formatter().parse(template) if name]
    return template.format(**{name: _FIELDS[name](rng) for name in dict.fromkeys(fields)})


@lru_cache(maxsize=4)
def general_prompts(size: int = POOL_SIZE, seed: int = 0) -> tuple[str, ...]:
    """``size`` distinct general prompts, the same for a given ``(POOL_VERSION, size, seed)``; every kind in
    turn, so each is about equally represented. Returned as a tuple (cached)."""
    rng = random.Random(f"hubunlearn-eco-pool-{POOL_VERSION}-{seed}")
    kinds = sorted(TEMPLATES)
    seen: dict[str, None] = {}
    attempts = 0
    while len(seen) < size and attempts < 50 * size:
        kind = kinds[attempts % len(kinds)]
        seen.setdefault(_fill(rng.choice(TEMPLATES[kind]), rng), None)
        attempts += 1
    return tuple(seen)


def pool_record(size: int = POOL_SIZE, seed: int = 0) -> dict:
    """What a bundle records of the pool its classifier saw."""
    return {"version": POOL_VERSION, "size": size, "seed": seed, "kinds": sorted(TEMPLATES)}
