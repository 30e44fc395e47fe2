# ---- a task of a fine-tuning cycle (suites/include/finetune.h), included by suites/tasks/ft_*.ecf ----
# maelflow nodes=%NODES:1%
# maelflow tasks_per_node=%TASKS_PER_NODE:1%
# maelflow gpus_per_node=%GPUS_PER_NODE:0%
# maelflow time=%TIME_LIMIT:01:00:00%
# Fine-tuning cycle %YMD% of model %MODEL%, task %TASK%: warmstart (resolve the champion alias now,
# check its training checkpoint on %SITE%, fix the cycle's dates), train %TRAINING% from it on the
# new data, sync, register, then champion/evaluate/gate as for any gated training. Every task of a
# cycle works in the cycle's own run folder (the deploy id with the date).
launch=""
if [ "%TASK%" = ft_train ]; then
  ecf --meter=resubmits %MAELFLOW_RESUBMITS:0%
  if [ $(( %NODES:1% * %TASKS_PER_NODE:1% )) -gt 1 ]; then
    launch="%MAELFLOW_LAUNCH:%"
  fi
fi
run $launch $MAELFLOW task finetune --task %TASK% --training %TRAINING% --site %SITE% --cycle %YMD%
