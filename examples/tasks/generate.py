"""Writes the task suite (`suite.jsonl`) and the training prompt pool (`pool.jsonl`).

The suite is what the gate and `protege eval` score a model on: the tasks enterprises distill
for, each case with an automatic check and a reference answer that passes it. Five families:

- classify: one label from a stated label set (support tickets, reviews, HR requests);
- extract: fields from a message into a JSON object, checked field by field;
- qa: short factual answers (capitals, science, arithmetic, unit conversions), with aliases;
- format: following output instructions (casing, numbered and comma lists, word limits,
  JSON shape);
- summarize: one sentence within a word limit that keeps the facts it is asked to keep;
- structured: the same kind of extraction asked with a `response_format` (json_schema), and
  requests that offer tools (`tool_choice` required or auto), checked by the call they make.

Every suite case is in one split: `dev` (for tuning recipes) or `gate` (scored by the gate,
never trained on, never used to pick hyper-parameters). `pool.jsonl` holds `train` prompts of
the same families for the loop to send to the teacher. The splits share no prompt, and the
factual questions (capitals, science) are partitioned so that no fact asked in one split is
asked in another. Deterministic (`random.Random(SEED)`; the structured family, added later, draws
from its own `random.Random(SEED + 1)` so the other families' cases stay as they were, and has
no `train` prompts); standard library only. Rerun it to
rewrite both files (a test checks they are what this script writes):

    python examples/tasks/generate.py [OUT_DIR]
"""

from __future__ import annotations

import json
import random
import re
import sys
from collections.abc import Callable
from pathlib import Path

SUITE = "protege-tasks/1"
SEED = 13
FAMILIES = ("classify", "extract", "qa", "format", "summarize")
SIZES = {"dev": 40, "gate": 60, "train": 160}  # cases per family and split
STRUCTURED_SIZES = {"dev": 20, "gate": 40}
SYSTEM = "You are a precise assistant for business tasks. Follow the output instructions exactly."
OUT = Path(__file__).parent

FIRST = ["Anna", "Ben", "Carla", "Dev", "Erik", "Fiona", "Goran", "Hana", "Ivan", "Julia",
         "Kenji", "Lena", "Marco", "Nadia", "Oscar", "Paula", "Quinn", "Rosa", "Stefan", "Tara",
         "Umar", "Vera", "Wim", "Yara", "Zoe"]
LAST = ["Novak", "Berg", "Silva", "Moreau", "Kowalski", "Tanaka", "Okafor", "Lindqvist",
        "Rossi", "Haddad", "Fischer", "Duarte", "Keller", "Nguyen", "Popescu", "Iversen"]
COMPANIES = ["Brightline Logistics", "Cobalt Analytics", "Dunmore Foods", "Evergreen Dental",
             "Fjord Software", "Granite Insurance", "Harbor Textiles", "Ironwood Labs",
             "Juniper Health", "Keystone Energy", "Lakeside Hotels", "Meridian Bank"]
PRODUCTS = ["standing desk", "label printer", "espresso machine", "noise-cancelling headset",
            "docking station", "ergonomic mouse", "projector", "paper shredder", "water filter",
            "barcode scanner", "conference speaker", "tablet stand"]
SERVICES = ["Payments API", "Customer Portal", "Search Service", "Mobile App", "Billing Engine",
            "Email Gateway", "Inventory Sync", "Login Service"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]
CITIES = ["Bergen", "Bilbao", "Brno", "Cork", "Ghent", "Kyoto", "Lille", "Perth", "Quebec",
          "Turin", "Uppsala", "Utrecht"]

# --- classify ------------------------------------------------------------------------------------

CLASSIFY = {
    "ticket": ("support ticket", ["billing", "technical", "account", "shipping"], {
        "billing": ["I see two charges of {n}0 EUR for the same {product}.",
                    "Your last invoice billed me for {n} licences but we only use one.",
                    "Please explain the extra fee on my statement from {weekday}.",
                    "I paid for the {product} but the payment shows as failed and was still taken."],
        "technical": ["The {product} shows error {n}{n}{n} every time it starts.",
                      "Since {weekday}'s update the {product} keeps disconnecting.",
                      "The app freezes when I upload a file larger than {n} MB.",
                      "My {product} stopped responding after the firmware update."],
        "account": ["I cannot log in because my password reset link has expired.",
                    "Please add my colleague {first} as an administrator on our account.",
                    "I need to change the phone number on my profile.",
                    "My account is locked after too many login attempts on {weekday}."],
        "shipping": ["The {product} I ordered {n} days ago has still not been delivered.",
                     "The courier left my {product} at the wrong address in {city}.",
                     "Can you send the {product} to our office in {city} instead?",
                     "The tracking page for my {product} has not changed since {weekday}."]}),
    "review": ("product review", ["positive", "negative", "neutral"], {
        "positive": ["The {product} exceeded my expectations and setup took {n} minutes.",
                     "Fantastic {product}; our whole team in {city} loves it.",
                     "Solid build, quiet, and the {product} was worth every cent."],
        "negative": ["The {product} stopped working after {n} days and support ignored me.",
                     "Awful {product}: it arrived scratched and the parts did not fit.",
                     "I regret buying this {product}; it is slow and keeps failing."],
        "neutral": ["The {product} arrived on {weekday} in standard packaging.",
                    "The {product} matches the description; I have no strong opinion yet.",
                    "This is the {product} we ordered. It does the job described on the box."]}),
    "hr": ("HR request", ["vacation", "payroll", "hardware", "facilities"], {
        "vacation": ["I would like to take {n} days off starting next {weekday}.",
                     "Can I move my approved leave to the week after next?",
                     "How many holiday days do I have left this year?"],
        "payroll": ["My salary for this month is {n}00 EUR lower than usual.",
                    "My payslip does not show the overtime I worked on {weekday}.",
                    "When will the bonus be paid into my bank account?"],
        "hardware": ["My laptop screen flickers and I need a replacement.",
                     "Could I get a second monitor and a {product} for my desk?",
                     "The keyboard of my work laptop has {n} broken keys."],
        "facilities": ["The heating on the {n}rd floor has not worked since {weekday}.",
                       "The meeting room door in the {city} office does not lock.",
                       "Please fix the leaking tap in the kitchen on floor {n}."]}),
}


def _slots(rng: random.Random) -> dict:
    return {"n": rng.randint(2, 9), "product": rng.choice(PRODUCTS),
            "weekday": rng.choice(WEEKDAYS), "city": rng.choice(CITIES),
            "first": rng.choice(FIRST)}


def classify(rng: random.Random) -> dict:
    kind = rng.choice(sorted(CLASSIFY))
    noun, labels, texts = CLASSIFY[kind]
    label = rng.choice(labels)
    text = rng.choice(texts[label]).format(**_slots(rng))
    ask = rng.choice(["Classify this {noun} into exactly one of these labels: {labels}. "
                      "Reply with the label only.",
                      "Which category fits this {noun} best? Choose one of: {labels}. "
                      "Answer with just the category."])
    user = ask.format(noun=noun, labels=", ".join(labels)) + f"\n\n{noun.capitalize()}: {text}"
    return _case("classify", kind, user, {"kind": "label", "label": label, "labels": labels},
                 label, max_tokens=16)


# --- extract -------------------------------------------------------------------------------------


def _person(rng: random.Random) -> tuple[str, str]:
    first, last = rng.choice(FIRST), rng.choice(LAST)
    return f"{first} {last}", f"{first.lower()}.{last.lower()}@{rng.choice(['mail', 'corp'])}.test"


def extract(rng: random.Random) -> dict:
    kind = rng.randrange(3)
    if kind == 0:
        name, email = _person(rng)
        company = rng.choice(COMPANIES)
        text = rng.choice([
            "Hello, this is {name} from {company}. Please write back to {email}.",
            "Thanks for the call today. Best regards, {name}, {company} ({email})",
            "{company} here: {name} will handle the contract; her address is {email}."]
        ).format(name=name, company=company, email=email)
        fields = {"name": name, "company": company, "email": email}
    elif kind == 1:
        order = f"PO-{rng.randint(1000, 9999)}"
        product, quantity = rng.choice(PRODUCTS), rng.randint(2, 40)
        text = rng.choice([
            "Please confirm purchase order {order}: {quantity} units of {product}.",
            "We would like {quantity} x {product} under order {order}.",
            "Order {order} should include {quantity} pieces of the {product}, thanks."]
        ).format(order=order, quantity=quantity, product=product)
        fields = {"order_id": order, "product": product, "quantity": quantity}
    else:
        name, _ = _person(rng)
        day, city = rng.choice(WEEKDAYS), rng.choice(CITIES)
        text = rng.choice([
            "{name} will visit our {city} office on {day} to review the plan.",
            "Reminder: meeting with {name} on {day} in {city}.",
            "On {day}, {name} presents the budget to the {city} team."]
        ).format(name=name, day=day, city=city)
        fields = {"person": name, "day": day, "city": city}
    keys = ", ".join(f'"{k}"' for k in fields)
    user = (f"Extract these fields from the message: {keys}. Reply with only a JSON object "
            f"with exactly those keys.\n\nMessage: {text}")
    return _case("extract", ["contact", "order", "meeting"][kind], user,
                 {"kind": "json_fields", "fields": fields}, json.dumps(fields), max_tokens=64)


# --- qa ------------------------------------------------------------------------------------------

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid",
    "Portugal": "Lisbon", "Japan": "Tokyo", "Canada": "Ottawa", "Australia": "Canberra",
    "Argentina": "Buenos Aires", "Egypt": "Cairo", "Kenya": "Nairobi", "India": "New Delhi",
    "China": "Beijing", "South Korea": "Seoul", "Norway": "Oslo", "Sweden": "Stockholm",
    "Finland": "Helsinki", "Poland": "Warsaw", "Greece": "Athens", "Turkey": "Ankara",
    "Mexico": "Mexico City", "Peru": "Lima", "Chile": "Santiago", "Thailand": "Bangkok",
    "Vietnam": "Hanoi", "Ireland": "Dublin", "Austria": "Vienna", "Hungary": "Budapest",
    "Denmark": "Copenhagen", "Russia": "Moscow", "Belgium": "Brussels", "Netherlands":
    "Amsterdam", "Switzerland": "Bern", "Brazil": "Brasilia", "Colombia": "Bogota",
    "Indonesia": "Jakarta", "Philippines": "Manila", "Iran": "Tehran", "Iraq": "Baghdad",
    "Saudi Arabia": "Riyadh", "Israel": "Jerusalem", "Cuba": "Havana", "Ukraine": "Kyiv",
    "Romania": "Bucharest", "Bulgaria": "Sofia", "Serbia": "Belgrade", "Croatia": "Zagreb",
    "Iceland": "Reykjavik", "Venezuela": "Caracas", "Pakistan": "Islamabad",
    "Bangladesh": "Dhaka", "Malaysia": "Kuala Lumpur", "Singapore": "Singapore",
    "Nigeria": "Abuja", "Ghana": "Accra", "Ethiopia": "Addis Ababa", "Morocco": "Rabat",
    "Algeria": "Algiers", "Tunisia": "Tunis", "Nepal": "Kathmandu",
}
SCIENCE = [
    ("What is the chemical symbol for gold?", ["Au"]),
    ("What is the chemical symbol for silver?", ["Ag"]),
    ("What is the chemical symbol for iron?", ["Fe"]),
    ("What is the chemical symbol for sodium?", ["Na"]),
    ("What is the chemical symbol for oxygen?", ["O"]),
    ("What is the chemical symbol for hydrogen?", ["H"]),
    ("What is the chemical formula of water?", ["H2O"]),
    ("What is the chemical formula of carbon dioxide?", ["CO2"]),
    ("How many planets are in the Solar System?", ["8", "eight"]),
    ("Which planet is closest to the Sun?", ["Mercury"]),
    ("Which is the largest planet in the Solar System?", ["Jupiter"]),
    ("Which planet is known as the Red Planet?", ["Mars"]),
    ("Which planet do we live on?", ["Earth"]),
    ("What is the largest ocean on Earth?", ["Pacific"]),
    ("What is the longest river in Africa?", ["Nile"]),
    ("What is the tallest mountain on Earth?", ["Everest"]),
    ("At what temperature in degrees Celsius does water boil at sea level?", ["100"]),
    ("At what temperature in degrees Celsius does water freeze?", ["0", "zero"]),
    ("How many days are in a leap year?", ["366"]),
    ("How many hours are in a day?", ["24", "twenty-four"]),
    ("How many minutes are in an hour?", ["60", "sixty"]),
    ("How many sides does a triangle have?", ["3", "three"]),
    ("How many sides does a hexagon have?", ["6", "six"]),
    ("How many legs does a spider have?", ["8", "eight"]),
    ("How many continents are there?", ["7", "seven"]),
    ("What gas do humans need to breathe to live?", ["oxygen"]),
    ("What gas do plants absorb from the air for photosynthesis?", ["carbon dioxide", "CO2"]),
    ("What is the freezing point of water in degrees Fahrenheit?", ["32"]),
    ("What is the SI unit of force?", ["newton"]),
    ("What is the SI unit of electric current?", ["ampere", "amp"]),
    ("What is the SI unit of energy?", ["joule"]),
    ("What is the SI unit of power?", ["watt"]),
    ("Which organ pumps blood through the human body?", ["heart"]),
    ("Which organ do humans use to breathe?", ["lungs", "lung"]),
    ("What is the closest star to Earth?", ["Sun"]),
    ("What is the natural satellite of Earth called?", ["Moon"]),
    ("What is the hardest natural material?", ["diamond"]),
    ("What color do you get by mixing blue and yellow?", ["green"]),
    ("What color do you get by mixing red and white?", ["pink"]),
    ("Who wrote Romeo and Juliet?", ["Shakespeare"]),
    ("In which country are the pyramids of Giza?", ["Egypt"]),
    ("What is the largest mammal?", ["blue whale", "whale"]),
    ("How many bytes are in a kilobyte in the decimal system?", ["1000", "1,000"]),
    ("How many bits are in a byte?", ["8", "eight"]),
    ("What does CPU stand for?", ["central processing unit"]),
]
UNITS = [("kilometers", "meters", 1000), ("kilograms", "grams", 1000), ("hours", "minutes", 60),
         ("minutes", "seconds", 60), ("days", "hours", 24), ("meters", "centimeters", 100),
         ("liters", "milliliters", 1000), ("weeks", "days", 7)]


def _facts(split: str) -> tuple[list[tuple[str, list[str]]], ...]:
    """The capitals and science questions of one split: a fixed shuffle cut in three."""
    out = []
    for facts in ([(f"What is the capital of {c}?", [a]) for c, a in CAPITALS.items()], SCIENCE):
        order = list(facts)
        random.Random(7).shuffle(order)
        third = len(order) // 3
        cut = {"train": order[:third], "dev": order[third:2 * third], "gate": order[2 * third:]}
        out.append(cut[split])
    return tuple(out)


def qa(rng: random.Random, split: str) -> dict:
    capitals, science = _facts(split)
    kind = rng.choice(["capital", "science", "arithmetic", "units"])
    if kind in ("capital", "science"):
        question, aliases = rng.choice(capitals if kind == "capital" else science)
    elif kind == "arithmetic":
        a, b = rng.randint(11, 99), rng.randint(2, 99)
        op = rng.choice(["plus", "minus", "times"])
        b = b if op != "times" else rng.randint(2, 9)
        value = a + b if op == "plus" else a - b if op == "minus" else a * b
        question, aliases = f"What is {a} {op} {b}?", [str(value)]
    else:
        source, target, factor = rng.choice(UNITS)
        amount = rng.choice([2, 3, 4, 5, 6, 8, 10, 12])
        question, aliases = f"How many {target} are in {amount} {source}?", [str(amount * factor)]
    user = question + " " + rng.choice(["Answer with just the answer.",
                                        "Reply with the answer only, no explanation."])
    return _case("qa", kind, user, {"kind": "aliases", "value": aliases}, aliases[0],
                 max_tokens=24)


# --- format --------------------------------------------------------------------------------------

CATEGORIES = {"fruits": ["apple", "banana", "cherry", "mango", "pear", "plum"],
              "colors": ["red", "blue", "green", "yellow", "purple", "orange"],
              "animals": ["dog", "cat", "horse", "eagle", "dolphin", "rabbit"],
              "vegetables": ["carrot", "potato", "onion", "pepper", "leek", "spinach"],
              "office supplies": ["stapler", "pen", "notebook", "folder", "ruler", "tape"],
              "programming languages": ["Python", "Java", "Rust", "Go", "Ruby", "Kotlin"]}
PHRASES = ["quarterly report approved", "meeting moved to friday", "server maintenance tonight",
           "welcome to the team", "invoice paid in full", "please update your password",
           "shipment delayed by two days", "new office opens in may", "budget review at noon",
           "training session is full"]
TOPICS = {"remote work": "remote", "cloud storage": "cloud", "customer feedback": "feedback",
          "a weekly team meeting": "meeting", "password security": "password",
          "an onboarding checklist": "onboarding", "recycling at the office": "recycl",
          "a product launch": "launch"}  # topic -> a word stem the answer must contain


def format_(rng: random.Random) -> dict:
    kind = rng.choice(["upper", "numbered", "comma", "words", "json"])
    if kind == "upper":
        phrase = rng.choice(PHRASES)
        user = f"Rewrite this text in uppercase letters only, nothing else: {phrase}"
        check = {"kind": "regex", "pattern": re.escape(phrase.upper()) + r"[.!]?",
                 "fullmatch": True}
        return _case("format", kind, user, check, phrase.upper(), max_tokens=24)
    if kind in ("numbered", "comma"):
        category, n = rng.choice(sorted(CATEGORIES)), rng.randint(3, 5)
        items = CATEGORIES[category][:n]
        if kind == "numbered":
            user = (f"List {n} {category} as a numbered list, one per line, with no other "
                    "text.")
            pattern = r"\n".join(rf"{i}\. *[^\n]+" for i in range(1, n + 1))
            reference = "\n".join(f"{i}. {x}" for i, x in enumerate(items, 1))
        else:
            user = (f"Name {n} {category} on one line, separated by commas, with no other "
                    "text.")
            pattern = r"[^,\n]+" + rf"(?:, *[^,\n]+){{{n - 1}}}\.?"
            reference = ", ".join(items)
        return _case("format", kind, user, {"kind": "regex", "pattern": pattern,
                                            "fullmatch": True}, reference, max_tokens=48)
    if kind == "words":
        topic, limit = rng.choice(sorted(TOPICS)), rng.choice([10, 12, 15, 20])
        user = f"Describe {topic} in one sentence of at most {limit} words."
        reference = f"A short note about {topic}."
        return _case("format", kind, user, {"kind": "contains", "value": [TOPICS[topic]],
                                            "min_words": 3, "max_words": limit},
                     reference, max_tokens=48)
    product, price = rng.choice(PRODUCTS), rng.randint(20, 900)
    user = (f'Return a JSON object describing a {product} that costs {price} EUR, with the keys '
            '"name" (a string) and "price" (a number). Output only the JSON.')
    schema = {"type": "object", "required": ["name", "price"],
              "properties": {"name": {"type": "string"}, "price": {"type": "number"}}}
    return _case("format", kind, user, {"kind": "json_schema", "schema": schema},
                 json.dumps({"name": product, "price": price}), max_tokens=48)


# --- summarize -----------------------------------------------------------------------------------


def summarize(rng: random.Random) -> dict:
    kind = rng.choice(["incident", "handover", "launch"])
    if kind == "incident":
        service, minutes, day = rng.choice(SERVICES), rng.choice([12, 25, 40, 55, 90]), \
            rng.choice(WEEKDAYS)
        text = (f"On {day} the {service} was unavailable for {minutes} minutes. Engineers "
                f"traced the fault to an expired certificate and renewed it. No data was lost, "
                f"and customers who saw errors were asked to retry.")
        keep, facts = "the service and how many minutes it was down", [service, str(minutes)]
        reference = f"The {service} was down for {minutes} minutes on {day}."
    elif kind == "handover":
        name, _ = _person(rng)
        first, day = name.split()[0], rng.choice(WEEKDAYS)
        company = rng.choice(COMPANIES)
        text = (f"In today's call with {company} we agreed on the revised delivery plan. "
                f"{name} will send the signed contract by {day}. Legal has already approved "
                f"the changes, and finance will issue the first invoice afterwards.")
        keep, facts = "who sends the contract and by which day", [first, day]
        reference = f"{name} will send the signed contract to {company} by {day}."
    else:
        company, city = rng.choice(COMPANIES), rng.choice(CITIES)
        people = rng.choice([30, 45, 60, 120, 200])
        text = (f"{company} will open a new branch in {city} next spring. The site will start "
                f"with {people} employees and serve customers in the whole region. Recruiting "
                f"begins next month.")
        keep, facts = "the company, the city and the number of employees", [company, city,
                                                                              str(people)]
        reference = f"{company} opens a {city} branch with {people} employees next spring."
    limit = 30
    user = (f"Summarize the text in one sentence of at most {limit} words. Keep {keep}.\n\n"
            f"Text: {text}")
    return _case("summarize", kind, user, {"kind": "contains", "value": facts,
                                           "max_words": limit}, reference, max_tokens=64)


# --- structured ----------------------------------------------------------------------------------

TICKETS = {
    "billing": ["I was charged twice for the {product} this month.",
                "The invoice for the {product} shows the wrong amount."],
    "network": ["The VPN in our {city} office keeps dropping.",
                "Nobody in {city} can reach the Wi-Fi since {weekday}."],
    "account": ["I am locked out of my account after a password reset.",
                "Please give {first} admin rights on our account."],
}
URGENCY = {True: ["It is urgent, the whole team is blocked.", "We need this fixed today."],
           False: ["No rush, whenever you have time.", "It can wait until next week."]}


def _function(name: str, description: str, properties: dict, required: list[str]) -> dict:
    return {"type": "function", "function": {
        "name": name, "description": description, "parameters": {
            "type": "object", "properties": properties, "required": required,
            "additionalProperties": False}}}


TOOLS = [
    _function("create_ticket", "Open a support ticket for the right team",
              {"team": {"enum": list(TICKETS)}, "urgent": {"type": "boolean"}},
              ["team", "urgent"]),
    _function("lookup_order", "Find the status of a purchase order",
              {"order_id": {"type": "string"}}, ["order_id"]),
    _function("schedule_meeting", "Book a meeting with a person on a weekday",
              {"person": {"type": "string"}, "day": {"enum": WEEKDAYS}}, ["person", "day"]),
]


def structured(rng: random.Random) -> dict:
    kind = rng.randrange(3)
    if kind == 0:  # extraction under a json_schema response_format
        base = extract(rng)
        fields = base["check"]["fields"]
        text = base["messages"][-1]["content"].split("Message: ", 1)[1]
        schema = {"type": "object", "properties": {
            k: {"type": "integer" if isinstance(v, int) else "string"} for k, v in fields.items()},
            "required": list(fields), "additionalProperties": False}
        case = _case("structured", "json_schema", f"Extract the details of this message.\n\n"
                     f"Message: {text}", {"kind": "json_fields", "fields": fields},
                     json.dumps(fields), max_tokens=64)
        case["response_format"] = {"type": "json_schema", "json_schema": {
            "name": "details", "strict": True, "schema": schema}}
        return case
    what = rng.randrange(3)
    if what == 0:
        team, urgent = rng.choice(list(TICKETS)), rng.random() < 0.5
        user = " ".join([rng.choice(TICKETS[team]).format(**_slots(rng)),
                         rng.choice(URGENCY[urgent])])
        name, arguments = "create_ticket", {"team": team, "urgent": urgent}
    elif what == 1:
        order = f"PO-{rng.randint(1000, 9999)}"
        user = rng.choice(["Where is my order {order}? It is late.",
                           "Can you check the status of purchase order {order}?"]).format(order=order)
        name, arguments = "lookup_order", {"order_id": order}
    else:
        person, day = _person(rng)[0], rng.choice(WEEKDAYS)
        user = rng.choice(["Book a meeting with {person} on {day}.",
                           "Please set up time with {person} this {day}."]).format(person=person,
                                                                                  day=day)
        name, arguments = "schedule_meeting", {"person": person, "day": day}
    choice = "required" if kind == 1 else "auto"
    call = json.dumps({"name": name, "arguments": arguments})
    case = _case("structured", f"tool_{choice}", user,
                 {"kind": "tool_call", "function": name, "fields": arguments},
                 f"<tool_call>\n{call}\n</tool_call>", max_tokens=64)
    case["tools"], case["tool_choice"] = TOOLS, choice
    return case


# --- the files -----------------------------------------------------------------------------------


def _case(family: str, kind: str, user: str, check: dict, reference: str, *,
          max_tokens: int) -> dict:
    return {"family": family, "kind": kind,
            "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}],
            "check": check, "reference": reference, "max_tokens": max_tokens}


MAKERS: dict[str, Callable[[random.Random, str], dict]] = {
    "classify": lambda rng, _split: classify(rng), "extract": lambda rng, _split: extract(rng),
    "qa": qa, "format": lambda rng, _split: format_(rng),
    "summarize": lambda rng, _split: summarize(rng)}


def generate() -> dict[str, list[dict]]:
    """split -> cases: `SIZES[split]` per family, no prompt in two places."""
    rng, seen = random.Random(SEED), set()
    out: dict[str, list[dict]] = {}
    for split in ("gate", "dev", "train"):
        rows = []
        for family in FAMILIES:
            made = 0
            for _ in range(SIZES[split] * 200):
                case = MAKERS[family](rng, split)
                prompt = case["messages"][-1]["content"]
                if prompt in seen:
                    continue
                seen.add(prompt)
                made += 1
                rows.append({"id": f"{split}-{family}-{made:03d}", "suite": SUITE,
                             "split": split, **case})
                if made == SIZES[split]:
                    break
            else:
                raise RuntimeError(f"{split}/{family}: only {made} distinct prompts")
        out[split] = rows
    rng = random.Random(SEED + 1)  # the structured family: its own draws, after the others
    for split, size in STRUCTURED_SIZES.items():
        made = 0
        for _ in range(size * 200):
            case = structured(rng)
            prompt = case["messages"][-1]["content"]
            if prompt in seen:
                continue
            seen.add(prompt)
            made += 1
            out[split].append({"id": f"{split}-structured-{made:03d}", "suite": SUITE,
                               "split": split, **case})
            if made == size:
                break
        else:
            raise RuntimeError(f"{split}/structured: only {made} distinct prompts")
    return out


def render(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def main(argv: list[str]) -> None:
    out = Path(argv[0]) if argv else OUT
    splits = generate()
    (out / "suite.jsonl").write_text(render(splits["dev"] + splits["gate"]), encoding="utf-8")
    (out / "pool.jsonl").write_text(render(splits["train"]), encoding="utf-8")
    print(f"wrote {out / 'suite.jsonl'} (dev {len(splits['dev'])}, gate {len(splits['gate'])}) "
          f"and {out / 'pool.jsonl'} (train {len(splits['train'])})")


if __name__ == "__main__":
    main(sys.argv[1:])
