"""Words that make poor DreamBooth instance tokens, for the warning that works without a tokenizer.

An instance token should be a rare made-up word ("zwx", "ohwx") that the model has no meaning for.
These are the words people actually end up with: class words ("man", "dog"), camera and download file
names ("IMG", "DSC", "image", "download"), the most frequent English words, and "sks", the token of
the DreamBooth paper's examples, which the real CLIP vocabulary already knows (a rifle). A real tokenizer
(`check_token(..., tokenizer=...)`) catches the rest of the vocabulary.
"""

from __future__ import annotations

_WORDS = """
    a about after all also an and any are as at be because been but by can come could day do even
    first for from get give go good have he her him his how i if in into it its just know like look
    make me most my new no not now of on one only or other our out over people say see she so some
    take than that the their them then there these they think this time to two up us use want way we
    well what when which who will with work would year you your
    man woman men women boy girl child kid baby person people guy lady gentleman face portrait selfie
    dog cat puppy kitten pet animal bird horse car house toy doll style art painting drawing character
    photo photograph picture image img pic pics dsc dscn dscf pxl dcim mvimg screenshot scan scanned
    whatsapp download downloaded untitled file copy new edited edit final export
    sks
"""
COMMON_WORDS: frozenset[str] = frozenset(_WORDS.split())
