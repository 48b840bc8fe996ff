mov r0, 0
mov r1, 5
add r0, r1
sub r1, 1
jne r1, 0, -3
stdw [r10-8], 1
lock fetch add [r10-8], r0
call 5
exit
