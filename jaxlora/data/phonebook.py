"""PhoneBook: synthetic (name, phone) facts, the study's cleanest probe of LoRA capacity.

The study trained on rows `Question: What is the phone number of {name}? Answer: {phone}` and
grew the data size by nested prefixes of one phonebook (1K tokens ⊂ 2K ⊂ ... ⊂ 20K), so that a
larger adapter's knowledge contains a smaller one's. jaxlora generates its own phonebook rather
than depending on the released files:

- Names: first + last name drawn from lists of a few hundred names each, of many origins, with
  occasional middle initials and double-barrelled surnames (as in the study's Faker-made book),
  unique within a book. Phones are NANP-like `ddd-ddd-dddd` with area code and exchange starting
  at 2-9, also unique.
- Prefix stability: rows are drawn one after the other from a single `random.Random(seed)`
  stream using only `random()` (whose sequence Python guarantees across versions), and a
  rejected duplicate only depends on earlier rows. So `generate_phonebook(n1, s)` is exactly the
  first n1 rows of `generate_phonebook(n2, s)`, and token budgets cut nested prefixes.
"""

from __future__ import annotations

import math
import random

from jaxlora.data.budget import check_budget_args, count_tokens, take_budget
from jaxlora.data.records import Record, row_record
from jaxlora.errors import DataError

PHONE_PATTERN = r"\d{3}-\d{3}-\d{4}"
ROW_QUESTION = "Question: What is the phone number of {name}? Answer:"

_MIDDLE_INITIAL_P = 0.1
_DOUBLE_SURNAME_P = 0.05


def _unique_words(block: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(block.split()))


# Uniform draws from these lists; duplicates across origins (e.g. Santiago) are dropped.
FIRST_NAMES: tuple[str, ...] = _unique_words("""
James Mary Robert Patricia John Jennifer Michael Linda David Elizabeth William Barbara Richard
Susan Joseph Jessica Thomas Sarah Charles Karen Christopher Lisa Daniel Nancy Matthew Betty
Anthony Margaret Mark Sandra Donald Ashley Steven Kimberly Paul Emily Andrew Donna Joshua
Michelle Kenneth Carol Kevin Amanda Brian Dorothy George Melissa Timothy Deborah Ronald
Stephanie Edward Rebecca Jason Sharon Jeffrey Laura Ryan Cynthia Jacob Kathleen Gary Amy
Nicholas Angela Eric Shirley Jonathan Anna Stephen Brenda Larry Pamela Justin Emma Scott Nicole
Brandon Helen Benjamin Samantha Samuel Katherine Gregory Christine Alexander Debra Frank Rachel
Patrick Carolyn Raymond Janet Jack Catherine Dennis Heather Tyler Diane Aaron Ruth Henry Julie
Adam Olivia Douglas Joyce Nathan Virginia Peter Victoria Zachary Kelly Kyle Lauren Walter
Gail Harold Joan Jeremy Evelyn Ethan Judith Megan Keith Andrea Roger Hannah Terry Martha
Jose Luis Carlos Jorge Miguel Alejandro Javier Diego Fernando Ricardo Eduardo Pablo Sergio Raul
Andres Mateo Santiago Camila Valentina Lucia Sofia Isabel Carmen Rosa Elena Gabriela Daniela
Paula Mariana Ximena Guadalupe Beatriz Marisol Joao Thiago Rafael Lucas Bruno Leticia Fernanda
Larissa Pierre Antoine Julien Mathieu Camille Chloe Manon Amelie Claire Margaux Theo Hugo
Giovanni Marco Luca Francesco Alessandro Giulia Chiara Francesca Matteo Lorenzo Federica Simona
Hans Klaus Stefan Jurgen Lukas Felix Greta Heike Anke Sven Lars Erik Astrid Ingrid Freya Nils
Bjorn Sigrid Pieter Joost Anouk Sanne Ivan Dmitri Sergei Alexei Nikolai Olga Natalia Tatiana
Svetlana Irina Katarzyna Piotr Tomasz Agnieszka Milos Dragana Jana Petra Ondrej Nikos Eleni
Dimitris Yannis Katerina Mehmet Mustafa Emre Elif Zeynep Aylin Burak Ahmed Mohamed Omar Ali
Hassan Khalid Youssef Tariq Fatima Aisha Layla Noor Mariam Yasmin Rania Salma Karim Reza
Dariush Parisa Shirin Navid Arash Leila Priya Raj Arjun Rohan Vikram Anil Sanjay Ravi Deepak
Amit Neha Pooja Ananya Kavya Meera Sunita Lakshmi Aditi Ishaan Rahul Farhan Imran Ayesha Nadia
Tanvir Wei Jing Ming Hui Xiaoming Yan Lei Jun Mei Ling Fang Hao Qiang Xin Zhen Tao Hiroshi
Takeshi Kenji Yuki Haruto Sota Aiko Yui Sakura Haruka Naoko Daisuke Kaito Rin Minjun Jiwoo
Seojun Hyun Jisoo Yuna Eunji Minseo Dongwoo Sungmin Anh Minh Linh Thanh Duc Somchai Nattapong
Kanya Arun Budi Siti Dewi Agus Putri Kwame Kofi Ama Abena Chinedu Ngozi Emeka Adaeze Oluwaseun
Folake Tendai Thabo Lerato Sipho Zanele Amara Juma Wanjiru Baraka Fatou Moussa Aminata Ousmane
Kagiso Ayodele Yaw Esi Chiamaka Nnamdi Yosef Avi Noa Tamar Eitan Shira Siobhan Aoife Ciaran
Declan Niamh Eoin Fiona Callum Rhys Gareth Bronwen Keanu Leilani Moana Aroha Wiremu Malia
""")

LAST_NAMES: tuple[str, ...] = _unique_words("""
Smith Johnson Williams Brown Jones Miller Davis Wilson Anderson Taylor Thomas Moore Jackson
Martin Thompson White Harris Clark Lewis Robinson Walker Young Allen King Wright Scott Hill
Green Adams Baker Nelson Carter Mitchell Roberts Turner Phillips Campbell Parker Evans Edwards
Collins Stewart Morris Murphy Cook Rogers Morgan Cooper Peterson Reed Bailey Bell Kelly Howard
Ward Cox Richardson Wood Watson Brooks Bennett Gray Hughes Price Sanders Myers Long Ross Foster
Powell Jenkins Perry Russell Sullivan Fisher Henderson Coleman Simmons Patterson Reynolds
Hamilton Graham Wallace Cole West Stone Hayes Gibson Ellis Ford Marshall Owens Harrison
Fletcher Buck Wyatt Shepherd Horton Lambert Barnes Holmes Porter Hunt Knight Palmer Webb
Spencer Mason Dixon Burke Fox Warren Hudson Chambers Lawson Freeman Weaver Gardner Payne Riley
Dunn Hart Garcia Rodriguez Martinez Hernandez Lopez Gonzalez Perez Sanchez Ramirez Torres
Flores Rivera Gomez Diaz Reyes Morales Cruz Ortiz Gutierrez Chavez Ramos Ruiz Alvarez Mendoza
Castillo Jimenez Moreno Romero Herrera Medina Aguilar Vargas Castro Guerrero Delgado Vega
Fuentes Navarro Salazar Rojas Silva Santos Oliveira Souza Pereira Costa Almeida Ferreira
Carvalho Rocha Dubois Lefebvre Moreau Laurent Girard Bonnet Fontaine Rousseau Mercier
Chevalier Leclerc Garnier Rossi Russo Ferrari Esposito Bianchi Romano Colombo Ricci Marino
Greco Gallo Conti DeLuca Mancini Lombardi Muller Schmidt Schneider Fischer Weber Meyer Becker
Hoffmann Schulz Koch Richter Klein Wolf Neumann Schwarz Zimmermann Braun Kruger Hartmann Lange
Wagner Jansen Bakker Visser Smit Mulder Hansen Johansson Larsen Nilsson Eriksson Lindqvist
Andersen Berg Virtanen Korhonen Ivanov Petrov Smirnov Kuznetsov Popov Sokolov Volkov Novak
Kowalski Nowak Wisniewski Wojcik Dvorak Horvat Kovac Popescu Ionescu Petrovic Jovanovic
Shevchenko Bondarenko Papadopoulos Georgiou Nikolaidis Christodoulou Yilmaz Kaya Demir Sahin
Celik Ozturk Aydin Haddad Khalil Mansour Nasser Saleh Hamdan Farouk Aziz Rahman Hussein
Abdullah Qureshi Karimi Hosseini Tehrani Rostami Jafari Patel Shah Sharma Singh Kumar Gupta
Reddy Iyer Nair Rao Mehta Chopra Das Banerjee Chatterjee Menon Pillai Joshi Desai Kapoor
Malhotra Bhatt Chowdhury Hossain Siddiqui Khan Wang Li Zhang Liu Chen Yang Huang Zhao Wu Zhou
Xu Sun Ma Zhu Hu Guo Lin He Gao Luo Zheng Liang Tang Xie Han Feng Deng Cao Sato Suzuki
Takahashi Tanaka Watanabe Ito Yamamoto Nakamura Kobayashi Kato Yoshida Yamada Sasaki Matsumoto
Inoue Kimura Hayashi Shimizu Kim Park Choi Jung Kang Cho Yoon Jang Lim Shin Oh Seo Kwon Nguyen
Tran Le Pham Hoang Phan Vu Dang Bui Do Ngo Duong Srisai Wongsakul Santoso Wijaya Hidayat
Kusuma Bautista Villanueva Aquino Santiago Okafor Okeke Adeyemi Nwosu Mensah Boateng Owusu
Asante Mwangi Otieno Kamau Ndlovu Dlamini Nkosi Mokoena Diallo Traore Keita Toure Balogun Eze
Abiodun Osei Achebe Banda Phiri Moyo O'Brien O'Connor MacDonald Fitzgerald Byrne Doyle
Gallagher McCarthy Kennedy Walsh Cohen Levi Friedman Katz Mizrahi Peretz Goldberg Rosenberg
Weiss Kahale Akana Kealoha Ngata Parata
""")

_INITIALS = "ABCDEFGHIJKLMNOPRSTVW"


def _pick(rng: random.Random, items: tuple[str, ...] | str) -> str:
    # Only `random()` is used: its sequence for a seed is stable across Python versions.
    return items[int(rng.random() * len(items))]


def _digits(rng: random.Random, n: int, first_min: int = 0) -> str:
    first = first_min + int(rng.random() * (10 - first_min))
    return str(first) + "".join(str(int(rng.random() * 10)) for _ in range(n - 1))


def _name(rng: random.Random) -> str:
    first, last = _pick(rng, FIRST_NAMES), _pick(rng, LAST_NAMES)
    if rng.random() < _DOUBLE_SURNAME_P:
        other = _pick(rng, LAST_NAMES)
        if other != last:
            last = f"{last}-{other}"
    if rng.random() < _MIDDLE_INITIAL_P:
        return f"{first} {_pick(rng, _INITIALS)}. {last}"
    return f"{first} {last}"


def _phone(rng: random.Random) -> str:
    return f"{_digits(rng, 3, 2)}-{_digits(rng, 3, 2)}-{_digits(rng, 4)}"


# Far beyond the study's largest budgets; larger requests are typos that would otherwise spend
# minutes drawing names.
MAX_ROWS = 1_000_000


def generate_phonebook(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """`n` unique (name, phone) pairs; prefix-stable in `n` for a fixed `seed`."""
    if n < 0:
        raise DataError(f"a phonebook needs a non-negative number of rows, got {n}")
    if n > MAX_ROWS:
        raise DataError(
            f"a generated phonebook has at most {MAX_ROWS:,} rows, {n:,} were asked for: "
            "use a smaller data.size_tokens / data.size_rows or a phonebook file in data.path"
        )
    rng = random.Random(seed)
    names: set[str] = set()
    phones: set[str] = set()
    book: list[tuple[str, str]] = []
    draws, max_draws = 0, 50 * n + 1000
    while len(book) < n:
        draws += 1
        if draws > max_draws:
            raise DataError(
                f"cannot draw {n} unique phonebook names (got {len(book)}): "
                "use a smaller data.size_tokens / data.size_rows or a phonebook file in data.path"
            )
        name = _name(rng)
        if name in names:
            continue
        phone = _phone(rng)
        while phone in phones:
            phone = _phone(rng)
        names.add(name)
        phones.add(phone)
        book.append((name, phone))
    return book


def phonebook_record(name: str, phone: str) -> Record:
    """The study's training row for one entry, with its recall prompt and answer."""
    return row_record(ROW_QUESTION.format(name=name), phone, subject=name)


def phonebook_records(
    tokenizer,
    *,
    size_tokens: int | None = None,
    size_rows: int | None = None,
    seed: int = 0,
) -> list[Record]:
    """A generated PhoneBook cut to a token or row budget (see `take_budget`).

    Enough rows are generated to exceed the budget, so any budget works, and the result for a
    larger budget always starts with the result for a smaller one (same seed and tokenizer).
    """
    if size_tokens is None and size_rows is None:
        raise DataError(
            "a generated phonebook needs a size: set data.size_tokens (e.g. 1000) or data.size_rows"
        )
    check_budget_args(size_tokens, size_rows)
    if size_rows is not None:
        records = [phonebook_record(*e) for e in generate_phonebook(size_rows, seed)]
        return take_budget(records, tokenizer, size_rows=size_rows)
    assert size_tokens is not None
    sample = [phonebook_record(*e) for e in generate_phonebook(64, seed)]
    per_row = float(count_tokens(sample, tokenizer).mean())
    n = math.ceil(1.1 * size_tokens / per_row) + 16
    if n > MAX_ROWS:
        raise DataError(
            f"data.size_tokens={size_tokens:,} needs about {n:,} phonebook rows, more than the "
            f"{MAX_ROWS:,} a generated phonebook offers: use a smaller data.size_tokens or a "
            "phonebook file in data.path"
        )
    while True:
        records = [phonebook_record(*e) for e in generate_phonebook(n, seed)]
        if int(count_tokens(records, tokenizer).sum()) > size_tokens:
            return take_budget(records, tokenizer, size_tokens=size_tokens)
        n *= 2
