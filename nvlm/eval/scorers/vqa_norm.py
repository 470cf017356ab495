"""VQA answer normalisation, as in the official VQA evaluation and the EvalAI / TextVQA answer processor.

Mirrors the behaviour of ``GT-Vision-Lab/VQA: PythonEvaluationTools/vqaEvaluation/vqaEval.py``
(``processPunctuation``, ``processDigitArticle``) and of ``facebookresearch/mmf: m4c_evaluators.py``
(``EvalAIAnswerProcessor``), including their quirks:

* the punctuation list leaves out ``.``, ``'``, ``:``, ``%``, ``$``, ``&``, ``*`` and ``#``;
* a mark is *deleted* (not spaced) when the original text has it next to a space, or when the text has a
  digit-comma-digit anywhere;
* every ``.`` not followed by a digit is deleted (the reference's look-behind is malformed, so ``"3."`` gives
  ``"3"``), at most 32 of them (the reference passes ``re.UNICODE`` (= 32) as the ``count`` argument);
* number words ``none``/``zero``…``ten`` become digits, articles ``a an the`` are dropped, and the
  contraction table below (taken verbatim from the reference as data) is applied to lower-cased tokens, so
  its capitalised keys (``Im``, ``Ive``…) never fire.
"""

from __future__ import annotations

import re

PUNCTUATION = [
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
]
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = ("a", "an", "the")

_CONTRACTION_DATA = """
    aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've
    couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've
    hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's
    howd=how'd howll=how'll hows=how's Id've=I'd've I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd
    itd've=it'd've it'dve=it'd've itll=it'll let's=let's maam=ma'am mightnt=mightn't
    mightnt've=mightn't've mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've
    neednt=needn't notve=not've oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at
    'ow'sat='ow's'at shant=shan't shed've=she'd've she'dve=she'd've she's=she's shouldve=should've
    shouldnt=shouldn't shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd
    somebodyd've=somebody'd've somebody'dve=somebody'd've somebodyll=somebody'll somebodys=somebody's
    someoned=someone'd someoned've=someone'd've someone'dve=someone'd've someonell=someone'll
    someones=someone's somethingd=something'd somethingd've=something'd've something'dve=something'd've
    somethingll=something'll thats=that's thered=there'd thered've=there'd've there'dve=there'd've
    therere=there're theres=there's theyd=they'd theyd've=they'd've they'dve=they'd've theyll=they'll
    theyre=they're theyve=they've twas='twas wasnt=wasn't wed've=we'd've we'dve=we'd've weve=we've
    werent=weren't whatll=what'll whatre=what're whats=what's whatve=what've whens=when's
    whered=where'd wheres=where's whereve=where've whod=who'd whod've=who'd've who'dve=who'd've
    wholl=who'll whos=who's whove=who've whyll=why'll whyre=why're whys=why's wont=won't
    wouldve=would've wouldnt=wouldn't wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all
    yall'll=y'all'll y'allll=y'all'll yall'd've=y'all'd've y'alld've=y'all'd've y'all'dve=y'all'd've
    youd=you'd youd've=you'd've you'dve=you'd've youll=you'll youre=you're youve=you've
"""
CONTRACTIONS: dict[str, str] = dict(pair.split("=") for pair in _CONTRACTION_DATA.split())

# Official VQA: a digit, a comma, a digit anywhere.  EvalAI/mmf: the same idea written with look-arounds.
VQA_COMMA = re.compile(r"\d,\d")
EVALAI_COMMA = re.compile(r"(?<=\d),+(?=\d)")
# Equivalent to the reference's "(?!<=\d)(\.)(?!\d)": its first group is a look-ahead that can never fail.
PERIOD = re.compile(r"\.(?!\d)")
PERIOD_LIMIT = 32  # re.UNICODE passed as the count argument


def process_punctuation(text: str, comma: re.Pattern[str] = VQA_COMMA) -> str:
    """``processPunctuation``: delete or space out each mark, then strip periods not before a digit."""
    out = text
    has_digit_comma = comma.search(text) is not None
    for mark in PUNCTUATION:
        if (mark + " " in text or " " + mark in text) or has_digit_comma:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return PERIOD.sub("", out, count=PERIOD_LIMIT)


def process_digit_article(text: str) -> str:
    """``processDigitArticle``: lower-case, number words to digits, drop articles, expand contractions."""
    words = []
    for word in text.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word not in ARTICLES:
            words.append(word)
    return " ".join(CONTRACTIONS.get(word, word) for word in words)


def vqa_normalize(text: str) -> str:
    """``processDigitArticle(processPunctuation(text))`` as the official VQA script applies it."""
    return process_digit_article(process_punctuation(text))


def evalai_normalize(text: str) -> str:
    """The EvalAI / TextVQA answer processor: always applied, to predictions and to every GT answer."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text, EVALAI_COMMA))
