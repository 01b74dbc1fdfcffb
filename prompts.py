"""The prompt layouts, each written once: Code Llama's infilling prompt (PSM and SPM), the Llama 2
chat layout of Code Llama - Instruct, and SmolLM2-Instruct's ChatML. Each chat layout is defined as
text pieces, and the infilling layout as pieces too; the token ids (with their loss mask, for
instruction tuning) are those pieces encoded, and the prompt text a /completions server gets is
the same pieces joined.

    from prompts import format_infill, infill_text, format_chat, chat_text
    ids = format_infill(tok, "def add(a, b):\n    ", "\n    return c\n")   # PSM
    text = infill_text("def add(a, b):\n    ", "\n    return c\n")     # the same, for a server
    ids = format_chat(tok, [{"role": "user", "content": "Reverse a list."}])
    text = chat_text([{"role": "user", "content": "Reverse a list."}], "llama2")
"""
import functools

from tokenizer import INFILL_PIECES

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
# Text the Llama 2 layout reserves; Code Llama's reference code refuses messages holding any
# (Code Llama sec. 2.5 uses Llama 2's chat layout; the check is that of Meta's generation code).
RESERVED_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>", "<step>")
# SmolLM2-Instruct's chat template adds this system turn when the dialog has none.
SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"


def infill_pieces(prefix, suffix, suffix_first=False):
    """Code Llama's infilling layout (sec. 2.3 and its reference code), written once: the names of
    the infilling tokens, and the texts as ("text", prefix), encoded as the start of a text, and
    ("infilling", suffix), encoded without SentencePiece's implicit leading space.
    PSM: ▁<PRE> prefix ▁<SUF> suffix ▁<MID>;  SPM: ▁<PRE> ▁<SUF> suffix ▁<MID> prefix.
    The model then writes the middle and stops at ▁<EOT>."""
    pre, suf, mid = (INFILL_PIECES[k] for k in ("prefix", "suffix", "middle"))
    if suffix_first:
        return [pre, suf, ("infilling", suffix), mid, ("text", prefix)]
    return [pre, ("text", prefix), suf, ("infilling", suffix), mid]


def format_infill(tok, prefix, suffix, suffix_first=False):
    """Code Llama's infilling prompt as ids: BOS where the tokenizer adds one, then infill_pieces.
    PSM: [BOS, ▁<PRE>] + enc(prefix) + [▁<SUF>] + enc_infilling(suffix) + [▁<MID>]
    SPM: [BOS, ▁<PRE>, ▁<SUF>] + enc_infilling(suffix) + [▁<MID>] + enc(prefix)
    BOS is tok.start_ids: there for Llama 2's tokenizer (Code Llama's reference code), absent for
    one whose prompts carry none (SmolLM2's), as at the start of every training document.
    """
    ids = {"prefix": tok.prefix_id, "suffix": tok.suffix_id, "middle": tok.middle_id,
           "eot": tok.eot_id}
    missing = [p for k, p in INFILL_PIECES.items() if ids[k] is None]
    if missing:
        raise ValueError(f"tokenizer {tok.path} lacks the infilling pieces {missing}; "
                         "make one with tokenizer.extend_tokenizer")
    out = list(tok.start_ids)  # BOS before <PRE> where prompts carry one, as documents do
    for piece in infill_pieces(prefix, suffix, suffix_first):
        if isinstance(piece, str):
            out.append(tok.piece_to_id(piece))
        else:
            kind, text = piece
            out += tok.encode(text) if kind == "text" else tok.encode_infilling(text)
    return out


def infill_text(prefix, suffix, suffix_first=False):
    """The infilling prompt as the text of a /completions request to a server that takes no token
    ids: infill_pieces joined, the infilling tokens written by name (a tokenizer.json tokenizer,
    as transformers runs it, reads an added token's name in text as the token). BOS is left to
    the server's tokenizer, as chat_text leaves it. A SentencePiece tokenizer run by transformers
    adds its implicit space before the suffix too, which format_infill leaves out: there the
    server's ids differ from ours (backends.OpenAIBackend checks)."""
    return "".join(p if isinstance(p, str) else p[1]
                   for p in infill_pieces(prefix, suffix, suffix_first))


# The prompt modes: Code Llama's two layouts, and the prefix alone continued left to right ("l2r"),
# what a model without FIM can do: the baseline an infilling model must beat on the same tasks.
INFILL_MODES = ("psm", "spm", "l2r")


def infill_prompt(tok, prefix, suffix, mode, heal=True):
    """(prompt ids, the ids token healing backed up) of one task in one mode: psm and spm are
    format_infill's layouts, l2r is tok.start_ids + enc(prefix) (one BOS rule for all three).

    Token healing (Code Llama App. E: use SPM "together with token healing"; the name is Microsoft
    Guidance's). In SPM and l2r the middle continues the prefix's tokens, and SPM trains on prefix
    and middle encoded as one text (sec. 2.3), as plain text is. A byte-level BPE (SmolLM2's) joins
    a line end to the next line's indentation ("\n" + 7 spaces is one token), so the prefix of a
    HumanEval line task, encoded alone, ends in a lone "\n" that training text never puts before
    an indented line (README: measured). With `heal`, the prompt's last prefix id is backed up
    (with the whitespace ids before it, when it is whitespace: the pre-tokenizer keeps a run of
    whitespace in one piece, so a blank line's spaces join the next indentation too) and the first
    ids generated must spell their bytes (heal_constraint): the model writes the boundary token as
    training text has it. PSM needs none: its middle is encoded alone in training as at
    inference (FIM on characters, each part with the tokenizer's own boundaries, as SantaCoder and
    StarCoder train), and training cuts at random characters end prefixes in any token."""
    if mode == "psm":
        return format_infill(tok, prefix, suffix), []
    if mode == "spm":
        prompt = format_infill(tok, prefix, suffix, suffix_first=True)
    elif mode == "l2r":
        prompt = tok.start_ids + tok.encode(prefix)
    else:
        raise ValueError(f"unknown infilling mode {mode!r}; choose from {', '.join(INFILL_MODES)}")
    n = len(tok.encode(prefix)) if heal else 0
    k = min(n, 1)
    while k < n and tok.token_bytes(prompt[-k]).isspace() and \
            tok.token_bytes(prompt[-k - 1]).isspace():
        k += 1
    return prompt[:len(prompt) - k], prompt[len(prompt) - k:]


@functools.lru_cache(maxsize=64)
def extending_ids(tok, left):
    """The ids whose bytes begin with `left`, or are a beginning of it (token healing)."""
    return [i for i in range(tok.vocab_size)
            if (b := tok.token_bytes(i)) and (b.startswith(left) or left.startswith(b))]


def heal_constraint(tok, healed):
    """sample.generate's `allowed` after a healed prompt: until the ids written spell the healed
    ids' bytes, only ids that go on spelling them (or spell them and more); then any."""
    if not healed:
        return None
    tail = b"".join(tok.token_bytes(i) for i in healed)

    def allowed(row, ids):
        done = b"".join(tok.token_bytes(i) for i in ids[:len(tail)])
        return extending_ids(tok, tail[len(done):]) if len(done) < len(tail) else None
    return allowed


def infill_decoder(tok, prefix, suffix_first, healed=()):
    """ids of a generated middle -> its text, as Code Llama decodes it. PSM: the middle was learnt
    without SentencePiece's implicit leading space (sec. 2.3), so decode_infilling. SPM (and the
    prefix alone): generation continues the prefix tokens, so the middle is what its ids add to
    the prefix; after token healing (infill_prompt), what they add to the prefix without its
    `healed` ids, less those ids' text."""
    if not suffix_first:
        return tok.decode_infilling
    head = tok.encode(prefix)
    if not healed:
        return tok.continuation(head)
    cont = tok.continuation(head[:len(head) - len(healed)])
    n = len(cont(healed))
    return lambda ids: cont(ids)[n:]


def infill_stop_ids(tok):
    """Where an infilling generation ends: at <EOT> (the model learnt to stop there, Bavarian et
    al. 2022, sec. 3), or at EOS should the model emit it."""
    return {i for i in (tok.eot_id, tok.eos_id) if i is not None}


def check_dialog(messages, roles=("user", "assistant")):
    """Messages are dicts with a str content: an optional system turn, then `roles` in turn.
    Returns the turns after the system message."""
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or "role" not in m:
            raise ValueError(f"message {k} must be a dict with 'role' and a str 'content': {m!r}")
    turns = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if not turns:
        raise ValueError("the dialog has no user message")
    for k, m in enumerate(turns):
        if m["role"] != roles[k % 2]:
            raise ValueError(f"message {k + len(messages) - len(turns)} has role {m['role']!r}; "
                             f"expected {roles[k % 2]!r} (optional system, then user/assistant "
                             "alternating)")
    return turns


# ---- Llama 2's layout (Code Llama - Instruct, sec. 2.5) ----

def llama2_pieces(messages):
    """The Llama 2 layout of a dialog as text pieces [(prompt, pair), ...]: prompt is
    "[INST] {user} [/INST]", pair is prompt + " {answer} " (None for a final user turn). Each piece
    is one text between BOS and EOS (a final prompt: after BOS only), as the reference encodes it.
    The system message is merged into the first user turn between <<SYS>> markers."""
    turns = check_dialog(messages)
    for m in messages:
        bad = [t for t in RESERVED_TAGS if t in m["content"]]
        if bad:
            raise ValueError(f"a {m['role']} message contains the reserved tags {bad}")
    turns = [dict(t) for t in turns]
    if messages[0]["role"] == "system":
        turns[0]["content"] = B_SYS + messages[0]["content"] + E_SYS + turns[0]["content"]
    pieces = []
    for k in range(0, len(turns), 2):
        prompt = f"{B_INST} {turns[k]['content'].strip()} {E_INST}"
        answer = turns[k + 1]["content"].strip() if k + 1 < len(turns) else None
        pieces.append((prompt, None if answer is None else f"{prompt} {answer} "))
    return pieces


def chat_tokens(tok, messages):
    """Llama 2 chat layout -> (ids, loss_mask): BOS + pair + EOS for each (user, answer) pair,
    BOS + prompt for a final user turn (llama2_pieces). loss_mask is True exactly on the answer
    tokens and their EOS: Llama 2's SFT trains on answers only (Llama 2 paper, sec. 3.1)."""
    ids, mask = [], []
    for prompt, pair in llama2_pieces(messages):
        prompt_ids = tok.encode(prompt, bos=True)
        if pair is None:
            ids += prompt_ids
            mask += [False] * len(prompt_ids)
            break
        pair_ids = tok.encode(pair, bos=True, eos=True)
        # The answer starts where the pair's ids leave the prompt's ids (the same place, as
        # both tokenizers split before the space that opens the answer).
        n = 0
        while n < min(len(prompt_ids), len(pair_ids)) and pair_ids[n] == prompt_ids[n]:
            n += 1
        ids += pair_ids
        mask += [False] * n + [True] * (len(pair_ids) - n)
    return ids, mask


def format_chat(tok, messages):
    """The Llama 2 chat prompt for a dialog ending with a user turn: it ends after "[/INST]"."""
    if not messages or messages[-1].get("role") != "user":
        raise ValueError("format_chat needs a dialog that ends with a user message")
    return chat_tokens(tok, messages)[0]


# ---- SmolLM2-Instruct's ChatML layout ----

def chatml_messages(messages):
    """The messages ChatML renders: the dialog, its default system turn first when it has none."""
    check_dialog(messages)
    if messages[0]["role"] != "system":
        messages = [{"role": "system", "content": SMOLLM2_SYSTEM}] + list(messages)
    return messages


def chatml_body(message):
    """The text between <|im_start|> and <|im_end|>, encoded as one text as the template is."""
    return f"{message['role']}\n{message['content']}"


def _chatml_ids(tok):
    start, end = tok.piece_to_id(IM_START), tok.piece_to_id(IM_END)
    if start is None or end is None:
        raise ValueError(f"tokenizer {tok.path} has no {IM_START}/{IM_END} tokens")
    return start, end


def chatml_tokens(tok, messages):
    """ChatML layout -> (ids, loss_mask), chat_tokens' counterpart: each message is
    "<|im_start|>{body}<|im_end|>\\n" (chatml_body), the default system turn first when the dialog
    has none. loss_mask is True exactly on each assistant content and its <|im_end|> (the token
    generation stops at), as chat_tokens masks answers and their EOS."""
    start, end = _chatml_ids(tok)
    newline = tok.encode("\n")
    header = tok.encode(chatml_body({"role": "assistant", "content": ""}))
    ids, mask = [], []
    for m in chatml_messages(messages):
        body = tok.encode(chatml_body(m))
        ids += [start] + body + [end] + newline
        if m["role"] != "assistant":
            mask += [False] * (len(body) + 2 + len(newline))
            continue
        # The answer starts where body leaves the header's ids (encoded as one text, as the
        # template is, so a token may straddle "\n" and the content: it counts as answer).
        n = 0
        while n < min(len(header), len(body)) and body[n] == header[n]:
            n += 1
        mask += [False] * (1 + n) + [True] * (len(body) - n + 1) + [False] * len(newline)
    return ids, mask


def format_chatml(tok, messages):
    """SmolLM2-Instruct's ChatML prompt, as its chat template renders and tokenizes it: the
    messages (chatml_tokens), then "<|im_start|>assistant\\n". Contents are plain text."""
    check_dialog(messages)
    if messages[-1]["role"] != "user":
        raise ValueError("format_chatml needs a dialog that ends with a user message")
    return (chatml_tokens(tok, messages)[0] + [_chatml_ids(tok)[0]]
            + tok.encode(chatml_body({"role": "assistant", "content": ""})))


# ---- either layout, by tokenizer or by name ----

def format_dialog(tok, messages):
    """The chat prompt in the tokenizer's own layout (tok.chat_format)."""
    if tok.chat_format == "chatml":
        return format_chatml(tok, messages)
    return format_chat(tok, messages)


def dialog_tokens(tok, messages):
    """(ids, loss_mask) of a whole dialog in the tokenizer's own layout, for instruction tuning."""
    return (chatml_tokens if tok.chat_format == "chatml" else chat_tokens)(tok, messages)


def chat_text(messages, chat_format, answer_start=""):
    """A dialog ending with a user turn, rendered as the prompt text of a /completions request,
    then `answer_start`, the beginning of the answer written for the model. The pieces are those
    format_chat and format_chatml encode, with BOS / EOS and ChatML's tokens written as text.

    llama2: "[INST] user [/INST] answer </s><s>[INST] user [/INST]". The first <s> is left to the
    server, whose tokenizer adds BOS to a completion prompt as it does to any text.
    chatml: SmolLM2's template, its default system turn too.
    """
    if not messages or messages[-1]["role"] != "user":
        raise ValueError("a prompt dialog must end with a user message")
    if chat_format == "chatml":
        head = chatml_body({"role": "assistant", "content": ""})
        return ("".join(f"{IM_START}{chatml_body(m)}{IM_END}\n" for m in chatml_messages(messages))
                + IM_START + head + answer_start)
    if chat_format != "llama2":
        raise ValueError(f"unknown chat format {chat_format!r} (llama2 or chatml)")
    pieces = llama2_pieces(messages)
    text = "".join(pair + "</s><s>" for _, pair in pieces[:-1]) + pieces[-1][0]
    return text + (" " + answer_start if answer_start else "")  # "[/INST] {answer}"
