"""A small synthetic shop, so the quickstart and the tests need no download.

What makes it useful rather than noise:
- Items belong to categories with readable names and titles built from category words
  ("Lumen Organic Green Tea Sampler"), so text embeddings and an LLM can see that two items
  are related, which is what SIA and ARV rely on.
- Users have one or two favourite categories and stay in them with ``category_stickiness``.
- Inside a category, items form "routines": each item has a few successors that tend to come
  next (a starter kit before its refills). This gives a sequential model an order to learn in
  both directions, so the reverse-trained candidate generator can find plausible
  *earlier* items, the signal LLMSeR builds on.
- Item popularity is Zipf-like and sequence lengths are Pareto-distributed, so there are head
  and tail items and a long tail of short users, as in the real datasets.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from llmser_ray.config import SyntheticConfig
from llmser_ray.data.importers import Raw

CATEGORIES: dict[str, list[str]] = {
    "Tea": ["Green Tea", "Black Tea", "Herbal Infusion", "Oolong", "Chai Blend", "Tea Sampler"],
    "Coffee": ["Espresso Beans", "Ground Coffee", "Cold Brew", "Decaf Roast", "Coffee Pods"],
    "Running": ["Running Shoes", "Running Socks", "Hydration Belt", "Reflective Vest", "Insoles"],
    "Yoga": ["Yoga Mat", "Yoga Block", "Strap", "Meditation Cushion", "Mat Cleaner"],
    "Skin Care": ["Face Cream", "Cleanser", "Serum", "Sunscreen", "Toner", "Eye Gel"],
    "Hair Care": ["Shampoo", "Conditioner", "Hair Oil", "Styling Gel", "Hair Mask"],
    "Baking": ["Bread Flour", "Sourdough Starter", "Baking Tray", "Proofing Basket", "Yeast"],
    "Gardening": ["Seed Kit", "Potting Soil", "Pruning Shears", "Watering Can", "Plant Food"],
    "Camping": ["Tent", "Sleeping Bag", "Camp Stove", "Headlamp", "Water Filter"],
    "Board Games": ["Strategy Game", "Card Game", "Expansion Pack", "Dice Set", "Puzzle"],
    "Stationery": ["Notebook", "Fountain Pen", "Ink Bottle", "Sketchbook", "Pencil Set"],
    "Pet Supplies": ["Dog Food", "Cat Litter", "Chew Toy", "Pet Shampoo", "Leash"],
    "Audio": ["Headphones", "Earbuds", "Speaker", "Audio Cable", "Ear Cushions"],
    "Cycling": ["Bike Helmet", "Bike Light", "Inner Tube", "Chain Oil", "Cycling Gloves"],
    "Cooking": ["Chef Knife", "Cast Iron Pan", "Spice Rack", "Cutting Board", "Olive Oil"],
    "Music": ["Guitar Strings", "Capo", "Tuner", "Drumsticks", "Sheet Music"],
}
ADJECTIVES = ["Organic", "Classic", "Premium", "Travel", "Everyday", "Pro", "Gentle", "Deluxe",
              "Compact", "Natural", "Ultra", "Essential", "Vintage", "Lightweight", "Family"]
BRANDS = ["Lumen", "Northwind", "Acme", "Bluebird", "Cedar & Co", "Oakline", "Sunpeak", "Marlow",
          "Tidewater", "Kestrel", "Fernhill", "Quill", "Harbor", "Nimbus", "Juniper", "Vale"]
SUCCESSORS = 3


def generate(cfg: SyntheticConfig) -> Raw:
    rng = np.random.default_rng(cfg.seed)
    names = list(CATEGORIES)
    extra = cfg.n_categories - len(names)
    names += [f"Category {i + 1}" for i in range(max(extra, 0))]
    names = names[: cfg.n_categories]

    # Items: category, title, attributes; popularity weights are Zipf within each category.
    item_cat = rng.integers(0, len(names), size=cfg.n_items)
    item_cat[: len(names)] = np.arange(min(len(names), cfg.n_items))  # every category has items
    titles, attrs = [], []
    seen_titles: set[str] = set()
    for i, c in enumerate(item_cat):
        nouns = CATEGORIES.get(names[c], [f"{names[c]} Item"])
        brand, adj, noun = rng.choice(BRANDS), rng.choice(ADJECTIVES), rng.choice(nouns)
        title = f"{brand} {adj} {noun}"
        if title in seen_titles:
            title = f"{title} No. {i + 1}"
        seen_titles.add(title)
        titles.append(title)
        attrs.append([str(brand), names[c], str(noun)])

    by_cat = [np.flatnonzero(item_cat == c) for c in range(len(names))]
    weights = []
    for members in by_cat:
        w = 1.0 / np.arange(1, len(members) + 1) ** 0.9
        rng.shuffle(w)
        weights.append(w / w.sum())
    # Routines: each item points at a few successors in its own category.
    successors = np.zeros((cfg.n_items, SUCCESSORS), dtype=np.int64)
    for c, members in enumerate(by_cat):
        for i in members:
            successors[i] = rng.choice(members, size=SUCCESSORS, p=weights[c])

    # Users: Pareto lengths (a long tail of short users), one or two favourite categories.
    lengths = np.minimum(cfg.max_len, np.floor(cfg.min_len * (1 + rng.pareto(cfg.length_alpha,
                                                                              cfg.n_users))))
    users, items, ts = [], [], []
    for u in range(cfg.n_users):
        favs = rng.choice(len(names), size=1 + int(rng.random() < 0.4), replace=False)
        cur = -1
        for t in range(int(lengths[u])):
            if cur >= 0 and rng.random() < 0.5:
                nxt = int(rng.choice(successors[cur]))  # follow the routine
            else:
                c = int(rng.choice(favs)) if rng.random() < cfg.category_stickiness \
                    else int(rng.integers(len(names)))
                nxt = int(rng.choice(by_cat[c], p=weights[c]))
            users.append(str(u + 1))
            items.append(str(nxt + 1))
            ts.append(float(t))
            cur = nxt
    inter = pd.DataFrame({"user": users, "item": items, "ts": ts})
    table = pd.DataFrame({"item": [str(i + 1) for i in range(cfg.n_items)], "title": titles,
                          "attributes": attrs})
    return Raw(inter, table, [])
