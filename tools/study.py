"""The tail-aware study of nbs/09f_study.ipynb (`make study`, `make study-quick`): arms x data sets x seeds of the same
`main`, written to results/study/ (resumable; refuses finished runs made by other code). See --help."""
from moleflow.study import main

if __name__ == '__main__': main()
