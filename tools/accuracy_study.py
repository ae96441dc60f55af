"""The accuracy study of nbs/09d_accuracy.ipynb (`make accuracy`): arms x sequences x seeds on the shared real data and
the generated set, and the nearest-neighbour reference, written to results/accuracy/ (resumable). See --help."""
from moleflow.diagnosis import main

if __name__ == '__main__': main()
