from mhc_train.analysis.cli import main

main()
