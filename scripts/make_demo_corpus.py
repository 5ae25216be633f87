"""Build the querytune demo corpus: short e-commerce / web search queries labelled with an intent.

The corpus is the offline quickstart dataset for the intent task. It is small on purpose (about 800
queries, so a model trains on it on two CPU cores in a few minutes) but varied: every intent has at
least 15 hand-written templates filled from hand-written slot lists, and a seeded noise step adds
typos, the odd capital letter and question marks, as people type them into a search box.

Everything here was written by the querytune authors; no third-party dataset was used.

Run from the repository root (standard library only, deterministic for a given seed):

    python scripts/make_demo_corpus.py

It writes ``train.jsonl``, ``validation.jsonl`` and ``test.jsonl`` (one ``{"text", "intent"}`` object per
line) to ``src/querytune/demo_data/queries/``. Texts are deduplicated across all intents and splits before
a seeded shuffle assigns each intent's queries to the splits.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

DEFAULT_SEED = 20240611
DEFAULT_OUT_DIR = Path(__file__).resolve().parents[1] / "src" / "querytune" / "demo_data" / "queries"
SPLITS = ("train", "validation", "test")
# Queries per split for each in-scope intent, and for the out-of-scope label.
IN_SCOPE_SIZES = {"train": 50, "validation": 10, "test": 12}
OOS_SIZES = {"train": 40, "validation": 10, "test": 20}
OOS = "oos"
MIN_WORDS, MAX_WORDS = 2, 10
MIN_TEMPLATES = 15

# Probabilities of the noise applied after a template is filled.
P_TYPO = 0.11
P_CAPITALISE = 0.05
P_QUESTION_MARK = 0.15

SlotValue = Sequence[str] | Callable[[random.Random], str]

# fmt: off
# ---------------------------------------------------------------------------------------------------------
# Slot lists. A value holding "|" is a tuple: "{pair_a}", "{pair_b}", "{pair_c}"... in one template read the fields
# of one draw, so that a use or spec named with a pair of models fits them.
# ---------------------------------------------------------------------------------------------------------
APPAREL = [
    "hoodie", "rain jacket", "running shorts", "skinny jeans", "linen shirt", "wool sweater", "puffer jacket",
    "yoga pants", "polo shirt", "swim trunks", "maxi dress", "denim jacket", "graphic tee", "chinos",
    "winter coat", "pajama set", "leggings", "cardigan", "fleece vest", "sports bra", "cargo pants",
    "flannel shirt", "beanie", "quarter zip",
]
SHOES = [
    "running shoes", "trail runners", "sneakers", "hiking boots", "sandals", "chelsea boots", "slippers",
    "loafers", "basketball shoes", "rain boots", "walking shoes", "high tops", "flip flops", "work boots",
    "slip ons",
]
ELECTRONICS = [
    "wireless earbuds", "noise cancelling headphones", "bluetooth speaker", "gaming mouse", "mechanical keyboard",
    "4k monitor", "usb c charger", "power bank", "smart watch", "fitness tracker", "tablet", "laptop", "webcam",
    "portable ssd", "hdmi cable", "phone case", "wifi router", "e reader", "soundbar", "gaming headset",
    "ring light", "dash cam",
]
HOME = [
    "air fryer", "coffee maker", "espresso machine", "robot vacuum", "blender", "desk lamp", "office chair",
    "standing desk", "memory foam pillow", "duvet cover", "cast iron skillet", "knife set", "electric kettle",
    "air purifier", "space heater", "bath towels", "shower curtain", "storage bins", "weighted blanket",
    "nonstick pan set",
]
MISC = [
    "yoga mat", "dumbbells", "camping tent", "sleeping bag", "water bottle", "hiking backpack",
    "carry on suitcase", "mineral sunscreen", "dry shampoo", "lego set", "board game", "dog bed", "cat litter",
    "baby stroller", "booster seat", "bike helmet", "phone tripod", "kids scooter", "1000 piece puzzle",
    "wall calendar",
]
GADGET_MODELS = [
    "sony wh-1000xm5", "bose quietcomfort earbuds", "jbl flip 6", "logitech mx master 3s", "anker power bank",
    "galaxy tab s9", "apple watch se", "garmin forerunner 255", "fitbit charge 6", "kindle paperwhite",
    "dell xps 13", "lenovo thinkpad", "razer deathadder", "lg ultragear monitor", "airpods pro",
    "beats studio buds", "sonos era 100", "gopro hero 12", "nintendo switch oled", "ps5 controller",
    "macbook air m3", "ipad mini", "galaxy buds 2", "pixel 8a",
]
HOME_MODELS = [
    "ninja air fryer", "dyson v15", "keurig k-mini", "nespresso vertuo", "instant pot duo",
    "kitchenaid stand mixer", "roomba j7", "breville barista express", "shark navigator", "le creuset dutch oven",
    "vitamix blender", "philips sonicare", "oral b io", "levoit air purifier", "cosori air fryer",
]
SHOE_MODELS = [
    "nike air max 90", "adidas samba", "new balance 550", "hoka clifton 9", "asics gel kayano",
    "converse chuck taylor", "vans old skool", "dr martens 1460", "birkenstock arizona", "crocs classic clog",
    "ugg tasman", "timberland 6 inch boots", "brooks ghost 15", "on cloud 5", "salomon xt-6",
]

SLOTS: dict[str, SlotValue] = {
    # --- products -----------------------------------------------------------------------------------------
    "apparel": APPAREL,
    "apparel_brand": [
        "nike", "adidas", "levis", "uniqlo", "patagonia", "north face", "h&m", "zara", "columbia", "under armour",
        "lululemon", "gap", "addidas", "patagucci", "abercrombie",
    ],
    "shoe": SHOES,
    "shoe_brand": ["nike", "adidas", "new balance", "asics", "puma", "skechers", "reebok", "under armour", "nikes"],
    "sport_shoe": [
        "running shoes", "trail runners", "sneakers", "basketball shoes", "walking shoes", "high tops", "slides",
        "training shoes", "tennis shoes",
    ],
    "shoe_model": SHOE_MODELS,
    "elec": ELECTRONICS,
    "gadget_model": GADGET_MODELS,
    "home": HOME,
    "home_model": HOME_MODELS,
    "misc": MISC,
    "item": APPAREL + SHOES + ELECTRONICS + HOME + MISC,
    "model": GADGET_MODELS + HOME_MODELS + SHOE_MODELS,
    "gadget": ["earbuds", "headphones", "speaker", "smart watch", "power bank", "headset", "fitness tracker"],
    "feature": [
        "usb c", "fast charging", "long battery life", "noise cancelling", "waterproof", "bluetooth 5.3",
        "wireless charging", "lightweight", "kids", "open ear",
    ],
    "storage_device": [
        "ipad", "galaxy tab s9", "macbook air", "portable ssd", "micro sd card", "iphone 15", "pixel 8",
        "usb flash drive",
    ],
    "gb": ["128gb", "256gb", "512gb", "1tb", "64 gb", "2tb", "256 gb"],
    "part": [
        "dyson v11 filter", "ninja blender blade", "keurig water filter", "roomba brush roll",
        "nespresso descaling kit", "sonicare brush heads", "instant pot sealing ring", "vacuum bags",
        "airpods ear tips", "apple watch band", "kindle charging cable",
    ],
    "color": [
        "black", "white", "navy", "olive", "beige", "red", "grey", "pink", "light blue", "burgundy",
        "forest green", "cream", "mustard yellow", "charcoal", "gray",
    ],
    "size": [
        "xs", "small", "medium", "large", "xl", "xxl", "size m", "size l", "petite", "plus size", "tall",
        "2xl", "size 14",
    ],
    "shoe_size": [
        "size 9", "size 10.5", "size 7", "eu 42", "eu 38", "uk 8", "us 11", "9 wide", "womens 8", "mens 10",
        "size 12",
    ],
    "price": [
        "under $50", "under 100", "under 30 dollars", "below $200", "less than 150", "under £40", "under 20",
        "cheap", "budget", "around $80", "under 500",
    ],
    "gender": ["mens", "womens", "kids", "boys", "girls", "unisex", "women", "men"],
    "occasion_item": [
        "dress for a wedding guest", "rain jacket for hiking", "outfit for a job interview", "shorts for the gym",
        "swimsuit for beach vacation", "boots for snow", "base layer for skiing", "jacket for a festival",
        "backpack for school", "shoes for standing all day", "leggings for hot yoga", "jacket for running in rain",
        "suit for prom", "socks for hiking",
    ],
    "recipient": [
        "dad", "mom", "teenage boy", "10 year old girl", "coworker", "new homeowner", "runner", "gamer",
        "grandma", "boyfriend", "girlfriend", "toddler",
    ],
    # --- orders, shipping, stores -----------------------------------------------------------------------------
    "order_no": lambda rng: rng.choice(["#", "", "no ", "ord-", "#"]) + str(rng.randint(100000, 99999999)),
    "track_no": lambda rng: rng.choice(["1z", "9400", "tba", "jd0", ""]) + str(rng.randint(10**8, 10**12)),
    "carrier": ["ups", "fedex", "usps", "dhl", "royal mail", "canada post", "evri", "ontrac"],
    "days": ["3 days", "5 days", "a week", "10 days", "two weeks", "14 days", "a month", "2 weeks", "4 days"],
    "order_state": [
        "pending", "on hold", "processing", "awaiting shipment", "label created", "in transit for a week",
        "out for delivery since yesterday", "partially shipped", "cancelled but i didnt cancel",
    ],
    "country": [
        "canada", "uk", "germany", "australia", "mexico", "ireland", "japan", "france", "new zealand",
        "netherlands", "india", "south africa", "spain", "norway",
    ],
    "region": [
        "alaska", "hawaii", "puerto rico", "northern ireland", "guam", "the scottish highlands", "rural areas",
        "the channel islands", "an apo address", "a po box",
    ],
    "city": [
        "chicago", "austin", "denver", "seattle", "boston", "brooklyn", "san diego", "portland", "miami",
        "atlanta", "phoenix", "nashville", "columbus", "manchester", "leeds", "toronto", "dallas", "minneapolis",
    ],
    "zip": ["90210", "10001", "60614", "78701", "98101", "33139", "30309", "02139", "94103", "80202", "m1 1ad"],
    "mall": [
        "westfield mall", "galleria", "mall of america", "king of prussia mall", "downtown crossing",
        "union square", "easton town center", "trafford centre",
    ],
    "holiday": [
        "sunday", "christmas eve", "thanksgiving", "new years day", "easter sunday", "labor day", "july 4th",
        "boxing day", "memorial day", "black friday", "saturday",
    ],
    "service": [
        "phone repair", "key cutting", "click and collect", "alterations", "bike repair", "photo printing",
        "returns desk", "fitting rooms", "curbside pickup",
    ],
    # --- deals, accounts, payment ---------------------------------------------------------------------------
    "event": [
        "black friday", "cyber monday", "boxing day", "memorial day", "labor day", "back to school", "christmas",
        "mothers day", "fathers day", "prime day", "4th of july", "singles day", "spring", "end of season",
    ],
    "category": [
        "shoes", "laptops", "tvs", "kitchen appliances", "furniture", "toys", "headphones", "jackets", "mattresses",
        "activewear", "baby gear", "skincare", "camping gear", "smart home", "phones", "jeans", "sneakers",
    ],
    "pct": ["10%", "20 percent", "30%", "50 percent", "15%", "25%", "40%", "70%"],
    "competitor": ["walmart", "target", "best buy", "amazon", "costco", "home depot", "currys", "argos"],
    "membership": [
        "plus membership", "premium membership", "rewards program", "vip club", "subscription box", "auto ship",
        "student plan",
    ],
    "login_method": ["google", "apple", "facebook", "apple id", "amazon", "microsoft"],
    "bnpl": ["klarna", "afterpay", "affirm", "paypal pay in 4", "zip", "sezzle", "shop pay installments"],
    "saved_card": ["card", "credit card", "mastercard", "visa debit", "amex", "paypal", "discover card"],
    "pay": [
        "paypal", "apple pay", "google pay", "klarna", "afterpay", "amex", "visa debit", "mastercard", "venmo",
        "affirm", "shop pay", "bank transfer", "discover card",
    ],
    "amount": ["$49.99", "$12.50", "200 dollars", "£35", "$1", "89.00", "$129", "$7.99", "$64.20", "300"],
    "error_code": [
        "error 502", "code 4012", "payment error 3ds", "something went wrong", "do not honor", "error p-104",
        "transaction failed",
    ],
    # --- comparison ----------------------------------------------------------------------------------------
    "pair": [
        "iphone 15|iphone 15 pro|photography|battery life", "airpods pro|galaxy buds 2 pro|android|noise cancelling",
        "sony wh-1000xm5|bose qc ultra|flights|comfort", "kindle paperwhite|kobo clara|library books|screen",
        "ninja air fryer|cosori air fryer|a family of four|basket size", "roomba j7|roborock s8|pet hair|suction",
        "macbook air m2|macbook air m3|college|performance", "ps5|xbox series x|a 10 year old|game library",
        "garmin forerunner 265|forerunner 965|marathon training|battery life",
        "hoka clifton|hoka bondi|flat feet|cushioning", "dyson v15|dyson v12|a small apartment|suction",
        "nespresso vertuo|nespresso original|lattes|pod price", "ipad air|ipad pro|drawing|screen",
        "pixel 8|galaxy s24|photos|camera", "kitchenaid artisan|kitchenaid classic|bread dough|bowl size",
        "apple watch|fitbit sense|sleep tracking|battery life", "nike pegasus|nike vomero|long runs|cushioning",
        "levis 501|levis 511|tall guys|fit", "vitamix|ninja blender|smoothies|noise",
        "north face nuptse|patagonia down sweater|very cold weather|warmth", "instant pot|crock pot|beginners|size",
        "switch oled|steam deck|travel|battery life", "jbl flip 6|jbl charge 5|the beach|sound quality",
        "brooks ghost|asics novablast|beginners|durability", "logitech mx keys|keychron k2|coding|typing feel",
        "galaxy tab s9|ipad air|note taking|price",
    ],
    "brand_pair": [
        "nike|adidas|running shoes|wide feet", "samsung|lg|tvs|gaming", "sony|bose|headphones|travel",
        "dyson|shark|vacuums|pet hair", "asics|brooks|running shoes|beginners", "apple|samsung|smart watches|fitness",
        "ninja|instant pot|air fryers|a small kitchen", "uniqlo|h&m|t shirts|everyday wear",
        "keurig|nespresso|coffee machines|an office", "lululemon|athleta|leggings|hot yoga",
        "garmin|coros|running watches|ultramarathons", "dell|lenovo|laptops|working from home",
        "hoka|on|sneakers|standing all day", "levis|wrangler|jeans|work",
    ],
    "vpair": [
        "oled|qled|a bright room", "memory foam|hybrid mattresses|back pain", "gore tex|regular rain jackets|hiking",
        "ceramic|nonstick pans|everyday cooking", "ssd|hdd|gaming", "merino|cotton socks|hiking",
        "down|synthetic jackets|wet weather", "wifi 6|wifi 7 routers|a big house", "gel|foam insoles|standing all day",
        "quartz|automatic watches|everyday wear", "slim fit|regular fit jeans|athletic legs",
        "air fryer|convection oven|a small kitchen",
    ],
    # --- how to ---------------------------------------------------------------------------------------------
    "task": [
        "descale a nespresso machine", "pair airpods with android", "clean white sneakers", "wash a down jacket",
        "set up a robot vacuum", "season a cast iron skillet", "measure my foot for shoe size",
        "factory reset apple watch", "connect bluetooth speaker to tv", "put on a duvet cover",
        "break in leather boots", "pitch a 4 person tent", "install a booster seat", "adjust a bike helmet",
        "charge a power bank", "replace vacuum filter", "use a french press", "assemble an office chair",
        "calibrate a 4k monitor", "remove pilling from sweater", "shrink jeans", "waterproof hiking boots",
        "update kindle software", "clean air fryer basket", "sharpen kitchen knives", "fold a stroller",
        "clean a yoga mat", "froth milk with espresso machine",
    ],
    "symptom": [
        "disconnecting", "beeping", "restarting", "overheating", "turning off", "blinking red", "dropping wifi",
        "making a loud noise", "losing bluetooth", "freezing",
    ],
    "furniture": ["standing desk", "bookshelf", "bed frame", "office chair", "crib", "bunk bed", "tv stand", "patio set"],
    "washable": [
        "wool sweater", "down jacket", "running shoes", "memory foam pillow", "silk blouse", "weighted blanket",
        "backpack", "bath mat", "leather jacket", "puffer jacket",
    ],
    "dishwasher_item": [
        "cast iron skillet", "air fryer basket", "nonstick pan", "blender jar", "knife set",
        "insulated water bottle", "instant pot lid", "wooden cutting board", "le creuset dutch oven",
    ],
    # --- out of scope ---------------------------------------------------------------------------------------
    "team": [
        "lakers", "celtics", "yankees", "red sox", "arsenal", "chelsea", "man united", "liverpool", "cowboys",
        "chiefs", "warriors", "packers", "real madrid", "barcelona",
    ],
    "match": [
        "lakers|celtics", "yankees|red sox", "arsenal|chelsea", "man united|liverpool", "cowboys|eagles",
        "chiefs|bills", "warriors|suns", "real madrid|barcelona", "packers|bears", "dodgers|giants",
    ],
    "sport_event": [
        "super bowl last year", "world cup 2022", "nba finals", "wimbledon", "the masters", "world series",
        "champions league final", "tour de france",
    ],
    "joke_topic": ["cats", "programmers", "pirates", "dads", "dinosaurs", "math", "teachers"],
    "landmark": [
        "the eiffel tower", "the empire state building", "the burj khalifa", "the statue of liberty", "big ben",
        "mount everest", "the golden gate bridge", "mount kilimanjaro",
    ],
    "phrase": ["good morning", "thank you", "where is the bathroom", "happy birthday", "i love you", "cheers"],
    "lang": ["spanish", "french", "japanese", "german", "italian", "korean"],
    "celebrity": [
        "taylor swift", "tom hanks", "lebron james", "beyonce", "keanu reeves", "serena williams", "zendaya",
    ],
    "conversion": [
        "5 miles to km", "70 f to c", "3 cups to ml", "180 lbs to kg", "100 usd to euro", "6 feet in cm",
        "2 liters to ounces",
    ],
    "dish": ["banana bread", "chicken curry", "lasagna", "pancakes", "guacamole", "sourdough", "pad thai"],
    "nonshop_task": [
        "write a cover letter", "tie a bowline knot", "calculate percentages", "get a passport", "meditate",
        "learn spanish fast", "file taxes", "lower blood pressure", "study for exams",
    ],
    "invention": ["telephone", "light bulb", "internet", "bicycle", "printing press", "airplane"],
    "sign": ["aries", "leo", "scorpio", "virgo", "gemini", "pisces"],
    "place": ["hospital", "gas station", "post office", "dog park", "dmv", "public library", "urgent care"],
    "sport": ["cricket", "rugby", "pickleball", "curling", "baseball", "chess"],
}

# ---------------------------------------------------------------------------------------------------------
# Templates. Confusable pairs are deliberate: "refund" shows up in return_refund and payment_issue, "order"
# in order_status, shipping_delivery, return_refund and payment_issue, "how to" in how_to, account_help,
# return_refund and oos, "vs" in product_compare, shipping_delivery and oos, "near me" in store_locator and oos.
# ---------------------------------------------------------------------------------------------------------
INTENTS: dict[str, tuple[str, list[str]]] = {
    "product_search": (
        "Looking for a product to buy, by type, brand, model, size, colour, feature or budget.",
        [
            "{apparel_brand} {apparel} {color}",
            "{color} {apparel} {size}",
            "{gender} {apparel} {size}",
            "{shoe_brand} {sport_shoe} {shoe_size}",
            "{gender} {shoe} {shoe_size}",
            "{shoe_model} {color}",
            "{shoe_model} {shoe_size}",
            "{elec} {price}",
            "{feature} {gadget}",
            "{storage_device} {gb}",
            "{home} {price}",
            "{home_model}",
            "{misc} {price}",
            "gift for {recipient} {price}",
            "looking for a {color} {apparel}",
            "do you sell {home_model}",
            "do you have {shoe_model} in {shoe_size}",
            "{occasion_item} {price}",
            "{color} {occasion_item}",
            "replacement {part}",
            "is the {gadget_model} back in stock",
            "{misc} in stock",
            "best {elec} {price}",
            "{gadget_model} refurbished",
            "{color} {home}",
        ],
    ),
    "order_status": (
        "Where an order already placed is and what state it is in: tracking, confirmation, changes, cancellation.",
        [
            "where is my order {order_no}",
            "track order {order_no}",
            "order {order_no} status",
            "my {item} hasnt arrived yet",
            "still waiting on my {model} order",
            "has my {item} shipped yet",
            "when will my {model} arrive",
            "{carrier} tracking number not working",
            "tracking number {track_no}",
            "order still processing after {days}",
            "ordered {days} ago still not shipped",
            "cancel my order {order_no}",
            "cancel order for {item}",
            "change address on order {order_no}",
            "order says {order_state}",
            "order {order_no} shows {order_state}",
            "no confirmation email for my {item} order",
            "is order {order_no} on the way",
            "estimated arrival for order {order_no}",
            "why is my {item} order delayed",
            "package says delivered but no {item}",
            "only got part of my order {order_no}",
            "can i add a {misc} to my existing order",
            "wheres my pakage {order_no}",
            "delivery date for order {order_no}",
            "{carrier} missed delivery of my {item}",
        ],
    ),
    "return_refund": (
        "Returning or exchanging something that was bought, return labels and policy, and refunds for returns.",
        [
            "return {item}",
            "how to return {item}",
            "how do i return a {model}",
            "return policy for {category}",
            "can i return {apparel} without tags",
            "exchange {shoe} for {shoe_size}",
            "{apparel} too small exchange for {size}",
            "refund status returned {item}",
            "returned my {model} {days} ago no refund",
            "refund not received after {days}",
            "print return label {carrier}",
            "lost my return label for order {order_no}",
            "return online order in store {city}",
            "damaged {item} want my money back",
            "{model} arrived broken return or replace",
            "{event} gift return window",
            "do i pay return shipping for {category}",
            "wrong size {shoe} sent need exchange",
            "can i return opened {elec}",
            "store credit or refund for returned {apparel}",
            "cancel my return request",
            "return {item} bought with gift card",
            "received wrong {color} {apparel} swap it",
            "retrun {item} no receipt",
            "returned {item} refund to {pay} not showing",
            "store credit for returned {item} not in account",
        ],
    ),
    "shipping_delivery": (
        "Shipping and delivery options in general: costs, speeds, destinations, carriers, delivery days.",
        [
            "shipping cost to {country}",
            "do you ship to {country}",
            "do you deliver to {region}",
            "free shipping minimum {country}",
            "how long does shipping take to {country}",
            "express delivery for {item}",
            "next day delivery {city}",
            "same day delivery in {city}",
            "delivery times before {event}",
            "order by when for {event} delivery",
            "do you deliver on {holiday}",
            "customs fees shipping to {country}",
            "which carrier ships to {region}",
            "can i choose {carrier} at checkout",
            "standard vs express shipping {country}",
            "shipping cost for {furniture}",
            "is shipping free over {amount}",
            "ship {item} as a gift to another address",
            "delivery fee {city}",
            "white glove delivery {furniture}",
            "do you ship {category} internationally",
            "how much is shipping on a {home_model}",
            "shiping to {country} how many days",
        ],
    ),
    "store_locator": (
        "Finding a physical store or pickup point: locations, opening hours, directions, in-store services.",
        [
            "store near {zip}",
            "nearest store to {city}",
            "store hours {city}",
            "is the {city} store open on {holiday}",
            "store opening hours {holiday}",
            "closest pickup point to {zip}",
            "outlet store near {city}",
            "stores with {service} in {city}",
            "does the {mall} store have {service}",
            "is the {home_model} in stock at {mall}",
            "check {shoe_model} stock in store {city}",
            "store inside {mall}",
            "directions to your {mall} location",
            "phone number for {city} store",
            "what time does the {mall} store close",
            "do you have a store in {country}",
            "parking at {mall} store",
            "{service} near {zip}",
            "click and collect locker in {city}",
            "is there a store near {mall}",
            "stor locations in {city}",
        ],
    ),
    "price_deal": (
        "Discounts and offers: sales, promo and coupon codes, price matching, price drops, loyalty rewards.",
        [
            "{apparel_brand} discount code",
            "promo code for {event}",
            "{event} deals on {category}",
            "{event} sale {elec}",
            "coupon for first order {category}",
            "student discount on {category}",
            "{category} on sale {price}",
            "clearance {gender} {apparel}",
            "price match {competitor} {model}",
            "will the {model} go on sale",
            "price drop alert {gadget_model}",
            "bundle deal {gadget_model}",
            "buy one get one free {category}",
            "{pct} off {category}",
            "when is the next {category} sale",
            "promo code not working for {category}",
            "price went down after i bought my {model}",
            "cheapest {model} deal",
            "free gift with {home_model}",
            "redeem reward points on {category}",
            "{competitor} has {model} cheaper",
            "any coupns for {apparel_brand}",
            "military discount {category}",
            "promo code disappeared at payment for {category}",
        ],
    ),
    "account_help": (
        "The shopper's account: sign-in, password, profile details, emails, memberships, deleting the account.",
        [
            "reset password",
            "cant log in to my account",
            "forgot pasword {login_method}",
            "sign in with {login_method} not working",
            "how to change email on my account",
            "delete my account and data",
            "update default address in my profile",
            "verification code not arriving",
            "unsubscribe from {category} emails",
            "account locked after too many attempts",
            "change phone number on account",
            "merge my {login_method} and email accounts",
            "cancel {membership}",
            "how do i pause my {membership}",
            "remove saved {saved_card} from account",
            "where is my order history in account",
            "my wishlist disappeared",
            "someone else logged into my account",
            "create account without {login_method}",
            "email verification link expired",
            "change language and currency in account",
            "turn off {category} notifications",
            "{membership} renewal date",
            "cant see my {membership} benefits",
            "login keeps failing on {login_method}",
            "update saved payment details",
            "change default payment method in profile",
        ],
    ),
    "product_compare": (
        "Comparing two or more products, models, brands or materials, or asking which one to pick.",
        [
            "{pair_a} vs {pair_b}",
            "{pair_a} or {pair_b} which is better",
            "difference between {pair_a} and {pair_b}",
            "compare {pair_a} {pair_b}",
            "{brand_pair_a} vs {brand_pair_b} {brand_pair_c}",
            "is {pair_a} better than {pair_b}",
            "{pair_a} or {pair_b} for {pair_c}",
            "{pair_a} vs {pair_b} {pair_d}",
            "{brand_pair_a} or {brand_pair_b} {brand_pair_c} for {brand_pair_d}",
            "should i get {pair_a} or {pair_b}",
            "{pair_a} compared to {pair_b}",
            "pros and cons {pair_a} {pair_b}",
            "{pair_a} {pair_b} side by side",
            "whats the difference between {vpair_a} and {vpair_b}",
            "{vpair_a} or {vpair_b} for {vpair_c}",
            "is {pair_b} worth the upgrade from {pair_a}",
            "which {brand_pair_c} are better {brand_pair_a} or {brand_pair_b}",
            "which is worth it {pair_a} or {pair_b}",
            "{pair_a} versus {pair_b} {pair_d}",
            "{brand_pair_a} vs {brand_pair_b} for {brand_pair_d}",
            "diffrence {pair_a} and {pair_b}",
        ],
    ),
    "how_to": (
        "Instructions for choosing, setting up, using, fixing or caring for a product.",
        [
            "how to {task}",
            "how do i {task}",
            "{task} instructions",
            "{gadget_model} setup",
            "{home_model} manual",
            "{gadget_model} not turning on",
            "{gadget} keeps {symptom}",
            "my {home_model} keeps {symptom}",
            "assemble {furniture} instructions",
            "what size {apparel} should i get",
            "{shoe_model} size guide",
            "can i put {dishwasher_item} in the dishwasher",
            "can you machine wash a {washable}",
            "how long to charge {gadget_model}",
            "update firmware {gadget_model}",
            "{home_model} cleaning tips",
            "best way to store {washable}",
            "{task} step by step",
            "reset {gadget_model} to factory settings",
            "does {shoe_model} run small",
            "how to use {home_model}",
        ],
    ),
    "payment_issue": (
        "Paying for an order: payment methods, declined or duplicate charges, invoices, gift card balance.",
        [
            "card declined at checkout",
            "{pay} payment failed",
            "charged twice for {item}",
            "charged twice refund the duplicate",
            "charged but no order confirmation",
            "can i pay with {pay}",
            "{pay} not showing at checkout",
            "split payment between two cards",
            "pay in installments with {bnpl}",
            "invoice for order {order_no}",
            "vat receipt for {model}",
            "check gift card balance",
            "gift card not working at checkout",
            "pending charge after cancelled {item} order",
            "why was i charged {amount}",
            "billing address doesnt match card",
            "{pay} {error_code}",
            "checkout {error_code}",
            "unauthorized charge from your store {amount}",
            "change payment method on order {order_no}",
            "foreign transaction fee on {amount} order",
            "{pay} declined but money taken",
            "payment pending for {days}",
            "do you accept {pay}",
            "paymnet didnt go through {pay}",
            "{pay} refund for double charge",
            "refund the extra {amount} you charged me",
        ],
    ),
    OOS: (
        "Out of scope: anything a shop's search box cannot serve (weather, jokes, sport, news, trivia, travel...).",
        [
            "weather in {city} tomorrow",
            "will it rain in {city} today",
            "{team} score",
            "{match_a} vs {match_b} score",
            "who won {sport_event}",
            "tell me a joke about {joke_topic}",
            "how tall is {landmark}",
            "capital of {country}",
            "translate {phrase} to {lang}",
            "how old is {celebrity}",
            "what time is it in {city}",
            "convert {conversion}",
            "recipe for {dish}",
            "movie times {city} tonight",
            "cheap flights to {city}",
            "how to {nonshop_task}",
            "who invented the {invention}",
            "population of {country}",
            "{sign} horoscope today",
            "{city} traffic right now",
            "{place} near me",
            "distance from {city} to {city2}",
            "rules of {sport}",
            "is {celebrity} married",
            "news today {country}",
            "sunset time {city}",
            "tax return deadline {country}",
        ],
    ),
}

# fmt: on

# ---------------------------------------------------------------------------------------------------------
# Filling templates and adding noise
# ---------------------------------------------------------------------------------------------------------
PLACEHOLDER = re.compile(r"\{([a-z_]+?)(\d*|_[a-d])\}")
QUESTION_STARTS = ("how ", "where ", "when ", "can ", "do ", "does ", "is ", "why ", "what ", "which ", "will ")
# fmt: off
KEYBOARD_NEIGHBOURS = {
    "a": "sq", "b": "vn", "c": "xv", "d": "sf", "e": "wr", "f": "dg", "g": "fh", "h": "gj", "i": "uo", "j": "hk",
    "k": "jl", "l": "k", "m": "n", "n": "bm", "o": "ip", "p": "o", "r": "et", "s": "ad", "t": "ry", "u": "yi",
    "v": "cb", "w": "qe", "y": "tu",
}
# fmt: on


def draw(slot: str, rng: random.Random) -> str:
    """Draw one value for a slot."""
    values = SLOTS[slot]
    return values(rng) if callable(values) else rng.choice(values)


def fill(template: str, rng: random.Random) -> str:
    """Fill a template's placeholders.

    ``{slot}`` and ``{slot2}`` draw distinct values from one list; ``{slot_a}``, ``{slot_b}``... read the fields
    of one draw of a tuple list (values written ``"a|b|c"``).
    """
    drawn: dict[str, str] = {}

    def replace(match: re.Match[str]) -> str:
        slot, suffix = match.group(1), match.group(2)
        key = slot + suffix
        if key not in drawn:
            if suffix.startswith("_"):
                for letter, field in zip("abcd", draw(slot, rng).split("|"), strict=False):
                    drawn[f"{slot}_{letter}"] = field
            else:
                taken = {value for name, value in drawn.items() if name.rstrip("0123456789") == slot}
                value = draw(slot, rng)
                while value in taken:
                    value = draw(slot, rng)
                drawn[key] = value
        return drawn[key]

    return PLACEHOLDER.sub(replace, template)


def typo(text: str, rng: random.Random) -> str:
    """Introduce one realistic typo (drop, swap, double or neighbouring key) in a word of five letters or more."""
    words = text.split()
    candidates = [i for i, word in enumerate(words) if len(word) >= 5 and word.isalpha()]
    if not candidates:
        return text
    i = rng.choice(candidates)
    word = words[i]
    pos = rng.randrange(1, len(word) - 1)
    kind = rng.choice(("drop", "swap", "double", "neighbour"))
    if kind == "drop":
        word = word[:pos] + word[pos + 1 :]
    elif kind == "swap":
        word = word[:pos] + word[pos + 1] + word[pos] + word[pos + 2 :]
    elif kind == "double":
        word = word[:pos] + word[pos] + word[pos:]
    elif word[pos] in KEYBOARD_NEIGHBOURS:
        word = word[:pos] + rng.choice(KEYBOARD_NEIGHBOURS[word[pos]]) + word[pos + 1 :]
    words[i] = word
    return " ".join(words)


def add_noise(text: str, rng: random.Random) -> str:
    """Make a clean query look typed: the odd typo, leading capital or question mark."""
    if rng.random() < P_TYPO:
        text = typo(text, rng)
    if text.startswith(QUESTION_STARTS) and rng.random() < P_QUESTION_MARK:
        text += "?"
    if rng.random() < P_CAPITALISE:
        text = text[0].upper() + text[1:]
    return text


def dedup_key(text: str) -> str:
    """Key under which two texts count as the same query (case, punctuation and spacing ignored)."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


# ---------------------------------------------------------------------------------------------------------
# Building the corpus
# ---------------------------------------------------------------------------------------------------------
def generate_intent(templates: list[str], target: int, rng: random.Random, seen: set[str]) -> list[str]:
    """Generate ``target`` queries unseen so far, cycling over the templates in shuffled rounds."""
    texts: list[str] = []
    order = list(templates)
    for _ in range(500):
        rng.shuffle(order)
        for template in order:
            if len(texts) == target:
                return texts
            clean = fill(template, rng)
            text = add_noise(clean, rng)
            keys = {dedup_key(clean), dedup_key(text)}
            if not MIN_WORDS <= len(text.split()) <= MAX_WORDS or keys & seen:
                continue
            seen.update(keys)
            texts.append(text)
    raise RuntimeError(f"could not generate {target} distinct queries from {len(templates)} templates")


def build_corpus(seed: int) -> dict[str, list[dict[str, str]]]:
    """Generate, deduplicate and split the corpus; returns split name -> rows."""
    rng = random.Random(seed)
    seen: set[str] = set()
    splits: dict[str, list[dict[str, str]]] = {split: [] for split in SPLITS}
    for intent, (_, templates) in INTENTS.items():
        if len(templates) < MIN_TEMPLATES:
            raise ValueError(f"{intent} has {len(templates)} templates, needs at least {MIN_TEMPLATES}")
        sizes = OOS_SIZES if intent == OOS else IN_SCOPE_SIZES
        texts = generate_intent(templates, sum(sizes.values()), rng, seen)
        rng.shuffle(texts)
        start = 0
        for split in SPLITS:
            splits[split].extend({"text": text, "intent": intent} for text in texts[start : start + sizes[split]])
            start += sizes[split]
    for rows in splits.values():
        rng.shuffle(rows)
    return splits


def write_jsonl(rows: list[dict[str, str]], path: Path) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    args = parser.parse_args(argv)

    splits = build_corpus(args.seed)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        write_jsonl(rows, args.out_dir / f"{split}.jsonl")
        counts = Counter(row["intent"] for row in rows)
        print(f"{split}: {len(rows)} queries, " + ", ".join(f"{k}={counts[k]}" for k in INTENTS))


if __name__ == "__main__":
    main()
