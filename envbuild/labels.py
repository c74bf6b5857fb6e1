"""The image label keys envbuild writes and reads: one place for every spelling."""

PREFIX = "io.envbuild."
VERSION = PREFIX + "version"
MODEL = PREFIX + "model"
CARD = PREFIX + "card"  # a800, a800+h20 or portable: what the tag and the context are named after
CARDS = PREFIX + "cards"  # every card the image is for, comma-separated
MODE = PREFIX + "mode"
ARCH_LIST = PREFIX + "arch-list"
FIXERS = PREFIX + "fixers"
DEVIATIONS = PREFIX + "deviations"
PLAN = PREFIX + "plan"
# packages installed from git, comma-separated: name=URL@COMMIT[#subdirectory=DIR] (only on images that have one)
GIT_PACKAGES = PREFIX + "git-packages"
SMOKE = PREFIX + "smoke"
BASE_CUDA = PREFIX + "base.cuda"  # on bases `envbuild base` made: the CUDA toolkit they carry
