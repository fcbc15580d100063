#!/usr/bin/env bash
# vizkit in CI: the commands both example workflows run (github-actions.yml, gitlab-ci.yml),
# kept here so that tests/test_ci_examples.py runs exactly them, end to end.
#
#   1. vizkit run "$MODEL" $IMAGES -t gradcam --save-arrays -o "$REPORT"
#   2. only when "$BASE_REPORT" holds a report (the workflow downloaded the main branch's
#      last one, on a pull/merge request): vizkit compare "$BASE_REPORT" "$REPORT"
#      -o "$COMPARISON" with one --fail-on per word of $FAIL_ON.
#
# Settings (environment variables):
#   MODEL        the model: a .keras/.h5 file, a keras.applications name, module:function (required)
#   IMAGES       image files and folders, separated by spaces (no spaces inside a path) (required)
#   REPORT       the report folder to write and archive                   (default: report)
#   BASE_REPORT  the base report to compare with, if present              (default: base-report)
#   COMPARISON   the comparison folder to write and archive               (default: comparison)
#   FAIL_ON      conditions that fail the comparison, separated by spaces
#                (default: "flips>0 gradcam.similarity<0.8"; grammar: vizkit compare --help)
#   RUN_ARGS     extra arguments for vizkit run, separated by spaces, e.g. "--no-metrics"
#
# Exit status: 0 when the run and the comparison are fine. Otherwise the run's status when
# it was not 0, else the comparison's:
#   run 1      the report was written, but an image, a technique, a metric or a report hook
#              failed. This fails CI (a technique that stops working is a regression), but the
#              comparison still runs and both folders are there to archive;
#   run 2/3/4/130  no report was written (bad arguments, internal error, disk, interrupted):
#              nothing to compare, nothing new to archive;
#   compare 1  a FAIL_ON condition holds (each is printed on stderr and shown on the page);
#   compare 2/3/4  bad arguments (an unreadable base report, a bad FAIL_ON), internal error,
#              the comparison could not be written.
# Archive REPORT and COMPARISON whatever the status: the workflows do.
set -uo pipefail  # not -e: the comparison runs even when the run exited 1
set -f            # IMAGES, FAIL_ON and RUN_ARGS are split on spaces, never globbed

: "${MODEL:?set MODEL to the model vizkit should explain}"
: "${IMAGES:?set IMAGES to the image files or folders}"
REPORT=${REPORT:-report}
BASE_REPORT=${BASE_REPORT:-base-report}
COMPARISON=${COMPARISON:-comparison}
FAIL_ON=${FAIL_ON-flips>0 gradcam.similarity<0.8}
RUN_ARGS=${RUN_ARGS-}

read -r -a images <<<"$IMAGES"
read -r -a run_args <<<"$RUN_ARGS"
fail_on=()
for condition in $FAIL_ON; do
    fail_on+=(--fail-on "$condition")
done

echo "+ vizkit run $MODEL ${images[*]} -t gradcam --save-arrays -o $REPORT ${run_args[*]}"
vizkit run "$MODEL" "${images[@]}" -t gradcam --save-arrays -o "$REPORT" "${run_args[@]}"
run_status=$?
if [ "$run_status" -ne 0 ] && [ "$run_status" -ne 1 ]; then
    echo "vizkit-ci: vizkit run exited $run_status: no report was written, nothing to compare" >&2
    exit "$run_status"
fi
[ "$run_status" -eq 1 ] && echo "vizkit-ci: vizkit run exited 1: the report was written, but something failed in it (see $REPORT/index.html)" >&2

compare_status=0
if [ -f "$BASE_REPORT/report.json" ]; then
    echo "+ vizkit compare $BASE_REPORT $REPORT -o $COMPARISON ${fail_on[*]}"
    vizkit compare "$BASE_REPORT" "$REPORT" -o "$COMPARISON" "${fail_on[@]}"
    compare_status=$?
elif [ -e "$BASE_REPORT" ]; then
    echo "vizkit-ci: $BASE_REPORT holds no report.json: is it the downloaded report folder?" >&2
    compare_status=2
else
    echo "vizkit-ci: no base report in $BASE_REPORT: nothing compared (a push to main, or no report on main yet)"
fi

if [ "$run_status" -ne 0 ]; then
    exit "$run_status"
fi
exit "$compare_status"
