"""Writes `enterprise.jsonl`: a deterministic prompt set of enterprise-style demo tasks.

Four tasks, each built from templates x slot fillers with `random.Random(0)`:
classification (ticket routing, review sentiment), extraction (fields into JSON), qa (short
factual answers) and summarization (a business paragraph in one sentence). All names, e-mail
addresses, companies and numbers are made up. Standard library only; rerun it to rewrite the file:

    python examples/prompts/generate.py [OUT]
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Callable
from pathlib import Path

DEFAULT_OUT = Path(__file__).with_name("enterprise.jsonl")
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]
FIRST = ["Jane", "John", "Alex", "Sam", "Priya", "Wei", "Fatima", "Lars", "Maria", "Tomas",
         "Aiko", "Omar", "Elena", "Noah", "Grace", "Ravi", "Chloe", "Mateo", "Ingrid", "Kofi"]
LAST = ["Example", "Sample", "Placeholder", "Testperson", "Demo", "Fakename", "Dummy", "Mockley"]
COMPANIES = ["Acme Widgets", "Globex Demo Ltd", "Initech Sample", "Umbrella Test Corp",
             "Northwind Placeholder", "Contoso Example", "Fabrikam Demo", "Tailspin Mock Air",
             "Wingtip Sample Toys", "Bluebird Fake Foods", "Stark Placeholder Tools",
             "Hooli Example Cloud"]
CITIES = ["Lyon", "Osaka", "Denver", "Leeds", "Porto", "Gdansk", "Pune", "Austin", "Graz",
          "Malmo", "Tampere", "Valencia"]
PRODUCTS = ["router", "laptop stand", "headset", "office chair", "coffee maker", "webcam",
            "keyboard", "monitor", "desk lamp", "backpack", "printer", "phone case"]
DEVICES = ["router", "laptop", "headset", "webcam", "printer", "smart speaker", "tablet",
           "smartwatch", "monitor", "wireless keyboard"]


def _unique(n: int, make: Callable[[], dict], seen: set[str]) -> list[dict]:
    """`n` rows from `make`, none repeating a user message seen before."""
    rows: list[dict] = []
    for _ in range(n * 50):
        if len(rows) == n:
            return rows
        row = make()
        user = row["messages"][-1]["content"]
        if user not in seen:
            seen.add(user)
            rows.append(row)
    raise RuntimeError(f"only {len(rows)} of {n} unique prompts: add templates or fillers")


def _row(task: str, system: str, user: str, reference, labels: list[str] | None = None) -> dict:
    row = {"task": task,
           "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]}
    if labels is not None:
        row["labels"] = labels
    row["reference"] = reference
    return row


# --- classification ---------------------------------------------------------------------------

TICKET_LABELS = ["billing", "technical", "account", "shipping"]
TICKETS = {
    "billing": ["I was charged twice for order {order}. Please refund one of the payments.",
                "My invoice for {month} shows {amount} EUR but my plan costs less. Why?",
                "Can I switch from monthly to yearly payment and get the discount?",
                "The refund for my returned {product} has not reached my card after {days} days.",
                "Why does my latest invoice include a late fee of {amount} EUR?",
                "Please send me a VAT invoice for order {order}."],
    "technical": ["The companion app for my {device} crashes whenever I open its settings.",
                  "After the update my {device} will not connect to the Wi-Fi anymore.",
                  "I get error code {code} when I try to sync my data.",
                  "The dashboard has been loading for {days} minutes and shows nothing.",
                  "My {device} firmware update stopped halfway and it no longer starts.",
                  "Exports to CSV produce an empty file since {month}."],
    "account": ["I forgot my password and the reset e-mail never arrives.",
                "Please change the e-mail address on my account to my work address.",
                "How do I add a second user to our company account?",
                "My account was locked after {days} failed login attempts.",
                "I want to close my account and delete my data.",
                "How can I turn on two-factor authentication for my login?"],
    "shipping": ["My {product} from order {order} still has not arrived after {days} days.",
                 "The tracking number for order {order} does not work on the courier site.",
                 "Can you ship my {product} to a different address than the billing one?",
                 "The parcel with my {product} arrived damaged. What should I do?",
                 "Do you deliver to {city}, and how long does it take?",
                 "Order {order} was marked as delivered but nothing is at my door."],
}
SENTIMENT_LABELS = ["positive", "negative", "neutral"]
REVIEWS = {
    "positive": ["The {product} works perfectly and arrived a day early. Very happy!",
                 "Great {product}, easy to set up and the support team was friendly.",
                 "I have used this {product} for {days} weeks now and I love it.",
                 "Excellent value for money; I would buy this {product} again."],
    "negative": ["The {product} broke after {days} days. Really disappointed.",
                 "Terrible experience: the {product} never worked and nobody answered my e-mails.",
                 "The {product} is noisy and much smaller than the pictures suggest.",
                 "I waited {days} days for a refund. I will not order here again."],
    "neutral": ["The {product} arrived on {weekday}. I have not tried it yet.",
                "The {product} does what the description says, nothing more.",
                "Packaging was plain; the {product} is the color shown on the website.",
                "I received the {product} after {days} days, as estimated at checkout."],
}


def _fill(rng: random.Random, template: str) -> str:
    return template.format(
        order=f"ORD-{rng.randint(10000, 99999)}", amount=rng.choice([19, 29, 49, 99, 149]),
        month=rng.choice(MONTHS), product=rng.choice(PRODUCTS), device=rng.choice(DEVICES),
        days=rng.randint(2, 21),
        code=f"E{rng.randint(100, 999)}", city=rng.choice(CITIES),
        weekday=rng.choice(["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]))


def classification(rng: random.Random, seen: set[str]) -> list[dict]:
    ticket_system = ("You route customer support tickets. Answer with exactly one label: "
                     + ", ".join(TICKET_LABELS) + ".")
    review_system = ("Classify the sentiment of the customer review. Answer with exactly one "
                     "word: " + ", ".join(SENTIMENT_LABELS) + ".")

    def ticket() -> dict:
        label = rng.choice(TICKET_LABELS)
        text = _fill(rng, rng.choice(TICKETS[label]))
        return _row("classification", ticket_system, f"Ticket: {text}", label, TICKET_LABELS)

    def review() -> dict:
        label = rng.choice(SENTIMENT_LABELS)
        text = _fill(rng, rng.choice(REVIEWS[label]))
        return _row("classification", review_system, f"Review: {text}", label, SENTIMENT_LABELS)

    return _unique(60, ticket, seen) + _unique(40, review, seen)


# --- extraction -------------------------------------------------------------------------------

ORDER_MESSAGES = [
    "Hi, this is {name} ({email}). My order {order} from {date} has not arrived yet.",
    "Hello, {name} here. I placed order {order} on {date}; please reply to {email}.",
    "Order {order} ({date}) is missing an item. Regards, {name}, {email}",
    "Please cancel order {order}, placed {date}. Thanks, {name}",
    "{name} writing: the invoice for order {order} never came. Contact me at {email}.",
    "Dear support, I ({name}) was charged on {date} but I cannot find my order number.",
]
INVOICE_MESSAGES = [
    "Invoice {number} from {vendor}: {amount} EUR, payable by {date}.",
    "{vendor} sent invoice {number} for {amount} EUR; it is due on {date}.",
    "Please pay {amount} EUR to {vendor} before {date} (reference {number}).",
    "Reminder from {vendor}: invoice {number} over {amount} EUR is due {date}.",
]


def _date(rng: random.Random) -> tuple[str, str]:
    """A date as written in a message, and as YYYY-MM-DD."""
    year, month, day = rng.choice([2024, 2025]), rng.randint(1, 12), rng.randint(1, 28)
    name = MONTHS[month - 1]
    text = rng.choice([f"{name} {day}, {year}", f"{day} {name} {year}",
                       f"{year}-{month:02d}-{day:02d}"])
    return text, f"{year}-{month:02d}-{day:02d}"


def extraction(rng: random.Random, seen: set[str]) -> list[dict]:
    order_keys = ["name", "email", "order_number", "date"]
    invoice_keys = ["vendor", "invoice_number", "amount_eur", "due_date"]

    def system(keys: list[str]) -> str:
        return ("Extract the fields from the message into a JSON object with exactly these keys: "
                + ", ".join(keys) + ". Write dates as YYYY-MM-DD and use null for a field the "
                "message does not contain. Answer with the JSON object only.")

    def order() -> dict:
        first, last = rng.choice(FIRST), rng.choice(LAST)
        email = f"{first.lower()}.{last.lower()}@example.{rng.choice(['com', 'org', 'net'])}"
        number = f"ORD-{rng.randint(10000, 99999)}"
        text, iso = _date(rng)
        template = rng.choice(ORDER_MESSAGES)
        user = template.format(name=f"{first} {last}", email=email, order=number, date=text)
        reference = {"name": f"{first} {last}",
                     "email": email if "{email}" in template else None,
                     "order_number": number if "{order}" in template else None,
                     "date": iso if "{date}" in template else None}
        return _row("extraction", system(order_keys), f"Message: {user}", reference)

    def invoice() -> dict:
        vendor = rng.choice(COMPANIES)
        number = f"INV-{rng.randint(2024, 2025)}-{rng.randint(100, 999)}"
        amount = rng.randint(40, 4000) + rng.choice([0, 0.5, 0.25, 0.99])
        text, iso = _date(rng)
        user = rng.choice(INVOICE_MESSAGES).format(vendor=vendor, number=number,
                                                   amount=f"{amount:.2f}", date=text)
        reference = {"vendor": vendor, "invoice_number": number,
                     "amount_eur": round(float(amount), 2), "due_date": iso}
        return _row("extraction", system(invoice_keys), f"Message: {user}", reference)

    return _unique(50, order, seen) + _unique(30, invoice, seen)


# --- qa ---------------------------------------------------------------------------------------

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid",
    "Portugal": "Lisbon", "Japan": "Tokyo", "Canada": "Ottawa", "Australia": "Canberra",
    "Argentina": "Buenos Aires", "Egypt": "Cairo", "Kenya": "Nairobi", "India": "New Delhi",
    "China": "Beijing", "South Korea": "Seoul", "Norway": "Oslo", "Sweden": "Stockholm",
    "Finland": "Helsinki", "Poland": "Warsaw", "Greece": "Athens", "Turkey": "Ankara",
    "Mexico": "Mexico City", "Peru": "Lima", "Chile": "Santiago", "Thailand": "Bangkok",
    "Vietnam": "Hanoi", "Ireland": "Dublin", "Austria": "Vienna", "Hungary": "Budapest",
    "Czech Republic": "Prague", "Denmark": "Copenhagen", "Nigeria": "Abuja", "Morocco": "Rabat",
    "New Zealand": "Wellington", "Cuba": "Havana", "Ghana": "Accra", "Ethiopia": "Addis Ababa",
}
SCIENCE = [
    ("What is the chemical symbol for gold?", "Au"),
    ("What is the chemical symbol for sodium?", "Na"),
    ("What is the chemical symbol for iron?", "Fe"),
    ("What is the chemical symbol for potassium?", "K"),
    ("What is the chemical formula of water?", "H2O"),
    ("How many planets are in the Solar System?", "8"),
    ("At what temperature in degrees Celsius does water boil at sea level?", "100"),
    ("At what temperature in degrees Fahrenheit does water freeze?", "32"),
    ("Which gas do plants take in for photosynthesis?", "carbon dioxide"),
    ("Which planet is closest to the Sun?", "Mercury"),
    ("Which is the largest planet in the Solar System?", "Jupiter"),
    ("Which planet is known as the Red Planet?", "Mars"),
    ("How many bones does an adult human body have?", "206"),
    ("What is the hardest natural material?", "diamond"),
    ("What is the atomic number of carbon?", "6"),
    ("What is the SI unit of force?", "newton"),
    ("What is the SI unit of electric current?", "ampere"),
    ("What is the SI unit of frequency?", "hertz"),
    ("How many chromosomes does a human cell normally have?", "46"),
    ("How many sides does a hexagon have?", "6"),
]
UNITS = [  # (from, to, factor)
    ("kilometers", "meters", 1000), ("kilograms", "grams", 1000), ("hours", "minutes", 60),
    ("liters", "milliliters", 1000), ("minutes", "seconds", 60), ("feet", "inches", 12),
    ("days", "hours", 24), ("meters", "centimeters", 100),
]


def _number(x: float) -> str:
    return str(int(x)) if x == int(x) else f"{x:g}"


def qa(rng: random.Random, seen: set[str]) -> list[dict]:
    system = "Answer the question briefly. Give only the answer, without explanation."
    rows = []
    for country, capital in CAPITALS.items():
        question = rng.choice(["What is the capital of {}?", "Which city is the capital of {}?",
                               "Name the capital city of {}."]).format(country)
        rows.append(_row("qa", system, question, capital))
    rows += [_row("qa", system, q, a) for q, a in SCIENCE]
    for row in rows:
        seen.add(row["messages"][-1]["content"])

    def units() -> dict:
        source, target, factor = rng.choice(UNITS)
        amount = rng.choice([1.5, 2, 2.5, 3, 4, 5, 7, 12])
        return _row("qa", system, f"How many {target} are in {_number(amount)} {source}?",
                    _number(amount * factor))

    def word_problem() -> dict:
        a, b = rng.randint(12, 90), rng.randint(2, 9)
        kind = rng.randrange(4)
        if kind == 0:
            q = (f"A support team closed {a} tickets on Monday and {a + b} on Tuesday. "
                 "How many tickets did it close in total?")
            return _row("qa", system, q, str(2 * a + b))
        if kind == 1:
            q = f"A box holds {b} laptops. How many boxes are needed to ship {a} laptops?"
            return _row("qa", system, q, str(-(-a // b)))
        if kind == 2:
            price, off = 20 * rng.randint(2, 30), rng.choice([10, 20, 25, 50])
            q = f"An item costs {price} EUR. What does it cost after a {off}% discount, in EUR?"
            return _row("qa", system, q, _number(price * (100 - off) / 100))
        q = f"A courier drives at {a} km/h for {b} hours. How many kilometers does it cover?"
        return _row("qa", system, q, str(a * b))

    return rows + _unique(16, units, seen) + _unique(24, word_problem, seen)


# --- summarization ----------------------------------------------------------------------------

EVENTS = [
    ["{company} announced on {weekday} that it will open a new office in {city}.",
     "The site will employ about {people} people by the end of {year}.",
     "The company said the location was chosen for its transport links and local talent.",
     "Hiring for the first {small} roles starts next month."],
    ["{company} reported quarterly revenue of {money} million EUR, up {pct}% from a year ago.",
     "Growth came mainly from its {product} line, while costs rose more slowly than sales.",
     "The board kept its full-year forecast unchanged.",
     "Shares rose {small}% in early trading in {city}."],
    ["{company} agreed to acquire a smaller rival based in {city} for {money} million EUR.",
     "The deal is expected to close in the {quarter} quarter, pending regulatory approval.",
     "Both brands will keep operating separately for at least {small} months.",
     "About {people} employees will join {company}."],
    ["{company} recalled {people} units of its {device} after reports of overheating.",
     "No injuries have been reported, the company said on {weekday}.",
     "Customers can return the product to any store in {city} or by mail for a full refund.",
     "The company expects the recall to cost about {small} million EUR."],
    ["{company} and {partner} signed a {small}-year partnership on {weekday}.",
     "The two firms will jointly sell {product} bundles to business customers.",
     "The first offers will launch in {city} in the {quarter} quarter.",
     "Financial terms were not disclosed."],
    ["A {small}-hour outage hit {company}'s online store on {weekday}.",
     "Around {people} orders were delayed while engineers restored the payment system.",
     "The company apologised and offered affected customers a {pct}% voucher.",
     "It said a faulty configuration change in its {city} data center caused the problem."],
    ["{company} launched a new {device} on {weekday} at an event in {city}.",
     "It will cost {price} EUR and ship in the {quarter} quarter.",
     "The company expects it to account for {pct}% of sales next year.",
     "Early reviewers praised its battery life but criticised the price."],
]


def summarization(rng: random.Random, seen: set[str]) -> list[dict]:
    system = "Summarize the text in one sentence."

    def make() -> dict:
        company, partner = rng.sample(COMPANIES, 2)
        slots = {"company": company, "partner": partner, "city": rng.choice(CITIES),
                 "product": rng.choice(PRODUCTS), "device": rng.choice(DEVICES),
                 "price": rng.choice([49, 99, 199, 349, 599]),
                 "people": rng.choice([40, 120, 250, 800, 1500]),
                 "year": rng.choice([2025, 2026]), "small": rng.randint(2, 9),
                 "money": rng.randint(3, 90), "pct": rng.choice([5, 8, 12, 15, 20]),
                 "quarter": rng.choice(["first", "second", "third", "fourth"]),
                 "weekday": rng.choice(["Monday", "Tuesday", "Wednesday", "Thursday"])}
        text = " ".join(s.format(**slots) for s in rng.choice(EVENTS))
        return _row("summarization", system, f"Text: {text}", None)

    return _unique(70, make, seen)


def generate() -> list[dict]:
    rng, seen = random.Random(0), set()
    rows = []
    for prefix, make in (("cls", classification), ("ext", extraction), ("qa", qa),
                         ("sum", summarization)):
        rows += [{"id": f"{prefix}-{i:04d}", **row} for i, row in enumerate(make(rng, seen), 1)]
    return rows


def main(argv: list[str]) -> None:
    out = Path(argv[0]) if argv else DEFAULT_OUT
    rows = generate()
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                   encoding="utf-8")
    counts = {}
    for r in rows:
        counts[r["task"]] = counts.get(r["task"], 0) + 1
    print(f"wrote {len(rows)} prompts to {out}: {counts}")


if __name__ == "__main__":
    main(sys.argv[1:])
