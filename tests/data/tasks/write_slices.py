"""Writes the tiny task slices the tests read: hand-written rows (not taken from the datasets) in each task's
published layout (field names and types of the hub copy lm-evaluation-harness reads), in the file formats the
suite accepts: jsonl, parquet, and Arrow as ``datasets`` writes it. Run it to regenerate them:
``python tests/data/tasks/write_slices.py``."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).parent


def arc(id_, question, texts, answer, labels="ABCD"):
    return {"id": id_, "question": question, "choices": {"text": texts, "label": list(labels[: len(texts)])},
            "answerKey": answer}


SLICES = {
    "arc_easy/test-00000-of-00001.parquet": [
        arc("Mercury_0001", "Which part of a plant takes in water from the soil?",
            ["leaves", "roots", "flowers", "seeds"], "B"),
        arc("Mercury_0002", "What do we call water falling from clouds as drops?",
            ["rain", "fog", "dew", "frost"], "A"),
        arc("NYSEDREGENTS_0003", "Which tool is best for measuring the length of a table?",
            ["a thermometer", "a balance", "a meter stick"], "C", labels="ABC"),
        arc("Mercury_0004", "A student mixes salt into warm water until it disappears. What has formed?",
            ["a solution", "a gas", "a solid", "an element"], "1", labels="1234"),  # numeric keys exist too
    ],
    # a train file in the same folder: the suite must read the test split only
    "arc_easy/train-00000-of-00001.parquet": [
        arc("Train_0001", "This row is training data and must never be scored.", ["yes", "no"], "A"),
    ],
    "arc_challenge/test-00000-of-00001.parquet": [
        arc("Mercury_7001", "Why does a metal spoon feel colder than a wooden spoon at the same temperature?",
            ["Metal conducts heat away from the hand faster.", "Metal is always colder than wood.",
             "Wood produces its own heat.", "Metal absorbs cold from the air."], "A"),
        arc("Mercury_7002", "Which change would most likely increase the rate of photosynthesis in a pond plant?",
            ["less sunlight", "more carbon dioxide in the water", "colder water", "fewer nutrients"], "B"),
        arc("Mercury_7003", "A ball rolls to a stop on grass. Which force mostly caused it to stop?",
            ["gravity", "magnetism", "friction", "buoyancy"], "C"),
    ],
    "piqa/validation.jsonl": [
        {"goal": "How do I keep cut apples from turning brown?",
         "sol1": "Brush the slices with a little lemon juice.", "sol2": "Brush the slices with a little sand.",
         "label": 0},
        {"goal": "To dry wet sneakers overnight,", "sol1": "put them in the freezer with the door open.",
         "sol2": "stuff them with crumpled newspaper and leave them somewhere warm.", "label": 1},
        {"goal": "How can you tell if an egg is fresh?", "sol1": "Place it in a bowl of water: fresh eggs sink.",
         "sol2": "Place it in a bowl of water: fresh eggs glow.", "label": 0},
    ],
    "winogrande/validation-00000-of-00001.parquet": [
        {"sentence": "The trophy would not fit in the suitcase because the _ was too big.",
         "option1": "trophy", "option2": "suitcase", "answer": "1"},
        {"sentence": "Sarah lent her umbrella to Maria because _ was going to walk home in the rain.",
         "option1": "Sarah", "option2": "Maria", "answer": "2"},
        {"sentence": "The bread was softer than the crackers, since the _ had been left out of the bag.",
         "option1": "bread", "option2": "crackers", "answer": "2"},
    ],
    "copa/data-00000-of-00001.arrow": [
        {"premise": "The man lost his balance on the ladder.", "choice1": "He fell to the ground.",
         "choice2": "He painted the ceiling.", "question": "effect", "idx": 0, "label": 0},
        {"premise": "The girl's cheeks turned red.", "choice1": "She ate a sandwich.",
         "choice2": "She felt embarrassed.", "question": "cause", "idx": 1, "label": 1},
        {"premise": "The pond froze over.", "choice1": "The temperature dropped below zero.",
         "choice2": "The ducks swam faster.", "question": "cause", "idx": 2, "label": 0},
    ],
    "commonsense_qa/validation.jsonl": [
        {"id": "cqa-1", "question": "Where would you put a bottle of milk to keep it cold?",
         "question_concept": "milk",
         "choices": {"label": ["A", "B", "C", "D", "E"], "text": ["oven", "refrigerator", "mailbox", "closet",
                                                                  "garden"]}, "answerKey": "B"},
        {"id": "cqa-2", "question": "What do people usually do when they are tired?",
         "question_concept": "tired",
         "choices": {"label": ["A", "B", "C", "D", "E"], "text": ["run a marathon", "sleep", "shout", "juggle",
                                                                  "paint"]}, "answerKey": "B"},
        {"id": "cqa-3", "question": "If you want to read a book for free, where might you go?",
         "question_concept": "book",
         "choices": {"label": ["A", "B", "C", "D", "E"], "text": ["library", "bakery", "gas station", "airport",
                                                                  "bank"]}, "answerKey": "A"},
    ],
    "openbookqa/test-00000-of-00001.parquet": [
        {"id": "obqa-1", "question_stem": "A magnet will most likely attract",
         "choices": {"text": ["a wooden spoon", "an iron nail", "a rubber band", "a glass marble"],
                     "label": ["A", "B", "C", "D"]}, "answerKey": "B"},
        {"id": "obqa-2", "question_stem": "When water is heated enough it will",
         "choices": {"text": ["turn into steam", "turn into sand", "become heavier", "freeze"],
                     "label": ["A", "B", "C", "D"]}, "answerKey": "A"},
        {"id": "obqa-3", "question_stem": "Plants need sunlight in order to",
         "choices": {"text": ["sleep", "make food", "walk", "sing"], "label": ["A", "B", "C", "D"]},
         "answerKey": "B"},
    ],
    "sciq/test.jsonl": [
        {"question": "What organ pumps blood through the human body?", "distractor1": "lungs",
         "distractor2": "liver", "distractor3": "kidney", "correct_answer": "heart",
         "support": "The heart is a muscular organ that pumps blood through the blood vessels."},
        {"question": "What is the boiling point of water at sea level in degrees Celsius?", "distractor1": "50",
         "distractor2": "0", "distractor3": "212", "correct_answer": "100", "support": ""},
        {"question": "Which gas do plants take in from the air?", "distractor1": "oxygen",
         "distractor2": "helium", "distractor3": "neon", "correct_answer": "carbon dioxide",
         "support": " Plants use carbon dioxide and water to make sugar during photosynthesis."},
    ],
    "siqa/validation.jsonl": [
        {"context": "Jordan forgot his lunch at home, so Riley shared a sandwich with him.",
         "question": "How would Jordan feel as a result?", "answerA": "grateful", "answerB": "angry",
         "answerC": "bored", "label": "1"},
        {"context": "Casey studied every night for the exam.", "question": "Why did Casey do this?",
         "answerA": "to forget the material", "answerB": "to do well on the test", "answerC": "to miss the exam",
         "label": "2"},
        {"context": "Alex spilled juice all over the kitchen floor.", "question": "What will Alex want to do next?",
         "answerA": "go to sleep", "answerB": "buy more juice", "answerC": "clean up the mess", "label": "3"},
    ],
    "boolq/validation-00000-of-00001.parquet": [
        {"question": "is the pacific ocean the largest ocean", "passage": "The Pacific Ocean is the largest and "
         "deepest of Earth's five oceanic divisions, covering about a third of the planet's surface.",
         "idx": 0, "label": 1},
        {"question": "do penguins live at the north pole", "passage": "Penguins live almost exclusively in the "
         "Southern Hemisphere; no wild penguins live in the Arctic.", "idx": 1, "label": 0},
        {"question": "can you see the great wall of china from the moon", "passage": "Contrary to a popular "
         "myth, the Great Wall is not visible to the naked eye from the Moon.", "idx": 2, "label": 0},
    ],
    "lambada/test.jsonl": [
        {"text": "She opened the old wooden box and found a faded photograph of her grandmother. She held the "
                 "picture close and smiled, remembering the stories her grandmother used to tell about the "
                 "photograph"},
        {"text": "The team had practised for months, and when the final whistle blew they had finally won the "
                 "championship. The players lifted the trophy above their heads and the crowd cheered for the "
                 "team"},
        {"text": "Tom knocked twice, waited, and knocked again. Nobody answered, so he slipped the letter under "
                 "the door"},
    ],
}


def write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:  # Arrow IPC stream: the format of the .arrow files datasets caches and saves
        table = pa.Table.from_pylist(rows)
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)


if __name__ == "__main__":
    for name, rows in SLICES.items():
        write(HERE / name, rows)
