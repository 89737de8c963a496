"""Self-checking exercises: ``check_*`` functions, one module per group of lessons.

``core`` holds the machinery (cases, known mistakes, plain-words verdicts); ``learner`` writes the
learner version of the notebooks (``python -m glm4moe_lib.exercises.learner``).
"""

from .core import Case, CheckResult, Mistake, check_function, compare_values
from .lesson_08 import *  # noqa: F401,F403
from .lesson_09 import *  # noqa: F401,F403
from .lesson_10 import *  # noqa: F401,F403
from .lessons_01_04 import *  # noqa: F401,F403
from .lessons_05_07 import *  # noqa: F401,F403
