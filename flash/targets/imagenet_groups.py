"""Everyday words for ImageNet's fine-grained animal classes ("Egyptian Mau" -> "cat").

A language model that has never heard of an "Egyptian Mau" or a "Bouvier des Flandres" writes about
Egyptian culture or Flanders; told "an Egyptian Mau (a cat)" it describes a cat. ImageNet-1k orders
its classes by WordNet subtree, so contiguous index ranges map onto a handful of everyday groups.
Objects (classes 398-999) are named plainly enough already and get no group.
"""

from __future__ import annotations

#: (first class index, last class index inclusive, everyday word), in index order.
GROUPS: tuple[tuple[int, int, str], ...] = (
    (0, 6, "fish"), (7, 24, "bird"), (25, 29, "salamander"), (30, 32, "frog"), (33, 37, "turtle"),
    (38, 48, "lizard"), (49, 50, "crocodile"), (52, 68, "snake"), (70, 78, "spider"), (80, 100, "bird"),
    (101, 101, "elephant"), (107, 107, "jellyfish"), (118, 126, "crustacean"), (127, 146, "bird"),
    (147, 148, "whale"), (150, 150, "sea lion"), (151, 268, "dog"), (269, 272, "wolf"), (277, 280, "fox"),
    (281, 285, "cat"), (286, 293, "big cat"), (294, 297, "bear"), (300, 307, "beetle"), (317, 318, "insect"),
    (321, 326, "butterfly"),
    (330, 332, "rabbit"), (339, 339, "horse"), (341, 343, "pig"), (345, 347, "cattle"), (348, 350, "sheep or goat"),
    (351, 353, "antelope"), (354, 354, "camel"), (365, 384, "monkey or ape"), (385, 386, "elephant"),
    (387, 388, "panda"), (389, 397, "fish"),
)


def everyday_group(class_index: int) -> str | None:
    """The everyday word for ImageNet class ``class_index``, or None where its own name is plain enough."""
    for first, last, word in GROUPS:
        if first <= class_index <= last:
            return word
    return None
