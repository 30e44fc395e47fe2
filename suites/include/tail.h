# ---- maelflow job trailer (suites/include/tail.h) --------------------------------------------
wait
ecf --complete
trap - 0
exit 0
